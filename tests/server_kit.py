"""What the HTTP-server tests share: a tiny Llama with a real (byte-level BPE)
tokenizer and chat template saved as a Hugging Face folder, adapters of several
methods saved beside it, and a real ``polyadapter serve`` process on 127.0.0.1 with
a free port, stopped at the end (bounded waits everywhere)."""
from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import polyadapter as pa

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = ("the quick brown fox jumps over the lazy dog. hello world, how are you today? "
        "adapters serve many tasks over one base model; every request picks its own. ") * 20


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator([TEXT], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|eos|>", pad_token="<|eos|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


ADAPTERS = {"lora": pa.LoraConfig(r=4, targets=["all-linear"]), "lora8": pa.LoraConfig(r=8),
            "lora16": pa.LoraConfig(r=16), "lorab": pa.LoraConfig(r=4, targets=["all-linear"]),
            "ia3": pa.IA3Config(), "bottleneck": pa.BottleneckConfig(),
            "prompt": pa.PromptConfig(num_virtual_tokens=3, seed=0)}


def build_folder(root: Path) -> dict:
    """A model folder and adapter folders under ``root``; returns their paths."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    model_dir = root / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    pm = pa.AdapterModel(model)
    g = torch.Generator().manual_seed(3)
    folders = {}
    for name, config in ADAPTERS.items():
        pm.add_adapter(name, config, activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        folders[name] = root / "adapters" / name
        pm.save_adapter(name, folders[name])
    folders["peft"] = root / "adapters" / "peft"  # the same LoRA in PEFT's format
    pm.save_adapter("lora", folders["peft"], format="peft")
    return {"model": model_dir, "adapters": folders}


class Server:
    """``polyadapter serve ARGS`` in a subprocess; ``url`` once it answers /health."""

    def __init__(self, args: list[str], timeout: float = 120, env: dict | None = None):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "polyadapter", "serve", "--host", "127.0.0.1",
                                      "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_for_url(timeout)

    def _read(self):
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _wait_for_url(self, timeout: float) -> str:
        import httpx
        deadline = time.monotonic() + timeout
        url = None
        while url is None:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            if line is None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.output))
            if line.startswith("polyadapter serving"):
                url = line.split(" on ")[-1].strip().removesuffix("/v1")
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not answer /health:\n" + "".join(self.output))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
