"""Run by tests/test_distributed.py under ``accelerate launch`` (2 processes, gloo on CPU),
and imported by it for the same tiny models and rows: trains a LoRA on a tiny Llama
(causal LM, rows of different lengths) and on a tiny BERT (classification) with DDP, and
the Llama one again with FSDP2; then runs training.py's own loops (what ``polyadapter
train --processes N`` runs) on both; and saves each adapter from the main process.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/distributed_worker.py OUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import polyadapter as pa

STEPS, BATCH, LR = 3, 4, 1e-2


def llama_lora():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    pm = pa.AdapterModel(LlamaForCausalLM(cfg).eval())
    pm.add_adapter("task", pa.LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    return pm


def bert_lora():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # no dropout: runs can agree
    pm = pa.AdapterModel(BertForSequenceClassification(cfg).eval())
    pm.add_adapter("task", pa.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]))
    return pm


def lm_rows(n=10, seed=1):
    """Rows of 5-12 tokens with the first 2 unlabelled: processes hold different token counts."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 100, (5 + (i * 3) % 8,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100, -100] + ids[2:]})
    return rows


def cls_rows(n=10, seed=2):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(3, 100, (4 + i % 5,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": int(ids[0] % 3)})
    return rows


def tiny_tokenizer():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(97)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def text_data():
    from polyadapter.data import TextDataset
    rows = cls_rows()
    return TextDataset([" ".join(f"w{i}" for i in r["input_ids"]) for r in rows], [r["labels"] for r in rows],
                       ["a", "b", "c"], name="toy")


class PadOnly:
    pad_token_id = 0


def loops() -> dict:
    """training.py's loops (those of ``polyadapter train``): a 5-row batch over 2 processes
    (shares of 3 and 2), and a 3-row causal-LM batch (2 and 1). In one process: the plain runs."""
    from polyadapter.training import train_adapter, train_lm_adapter
    bert, llama = bert_lora(), llama_lora()
    train_adapter(bert, "task", text_data(), tiny_tokenizer(), epochs=2, lr=1e-2, batch_size=5, max_length=16,
                  progress=False)
    train_lm_adapter(llama, "task", lm_rows(), PadOnly(), steps=3, batch_size=3, lr=1e-2, progress=False)
    return {"loop_bert": bert, "loop_llama": llama}


def main(out: Path) -> None:
    from polyadapter import distributed
    acc = distributed.accelerator()
    report = {"processes": acc.num_processes, "distributed_type": str(acc.distributed_type)}
    for key, make, rows, task in (("ddp_llama", llama_lora, lm_rows(), "causal-lm"),
                                  ("ddp_bert", bert_lora, cls_rows(), "classification")):
        pm = make()
        report[key] = distributed.train(pm, "task", rows, steps=STEPS, batch_size=BATCH, task=task, lr=LR,
                                        out=out / key, acc=acc)
        report[key]["adapter_tensors"] = len(pm.adapter_parameters("task"))
        report[key]["adapter_parameters"] = sum(p.numel() for p in pm.adapter_parameters("task").values())
    pm = llama_lora()
    base_total = sum(p.numel() for n, p in pm.model.named_parameters() if ".adapters." not in n)
    report["fsdp_llama"] = distributed.train(pm, "task", lm_rows(), steps=STEPS, batch_size=BATCH,
                                             task="causal-lm", lr=LR, out=out / "fsdp_llama", acc=acc, fsdp=True)
    local = sum(p.to_local().numel() for n, p in pm.model.named_parameters() if ".adapters." not in n)
    report["fsdp_llama"].update({"base_total": base_total, "base_local": local})
    for key, pm in loops().items():
        report[key] = pm.record("task").provenance["training"]
        if acc.is_main_process:
            pm.save_adapter("task", out / key)
    if acc.is_main_process:
        (out / "report.json").write_text(json.dumps(report, indent=1))
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
