"""Prompt tuning: virtual tokens prepended at the input, on tiny BERT and Llama."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import polyadapter as pa
from polyadapter import ConfigError, PolyAdapterError, PromptConfig, StateError, TargetError
from polyadapter import config_from_dict

from conftest import make_inputs, make_model, output_of

P = 4  # virtual tokens in most tests: inputs are 7 tokens, position tables hold 64


def prompted(kind: str, name: str = "p", **kw) -> pa.AdapterModel:
    pm = pa.wrap(make_model(kind))
    pm.add_adapter(name, PromptConfig(num_virtual_tokens=kw.pop("num_virtual_tokens", P), seed=0, **kw))
    return pm


# ---------------------------------------------------------------- forward


def test_bert_classification_shape_and_change():
    pm = pa.wrap(make_model("bert"))
    inputs = make_inputs("bert")
    base = output_of(pm, inputs)
    pm.add_adapter("p", PromptConfig(num_virtual_tokens=P, seed=0))
    with torch.no_grad():
        pm.input_parts["p"].embeddings.mul_(3)  # make sure the prompt really matters
    out = output_of(pm, inputs)
    assert out.shape == base.shape == (2, 3)
    assert not torch.allclose(out, base)
    pm.set_active()
    assert torch.equal(output_of(pm, inputs), base)


def test_llama_causal_lm_shape_and_change():
    pm = pa.wrap(make_model("llama"))
    inputs = make_inputs("llama")
    base = output_of(pm, inputs)
    pm.add_adapter("p", PromptConfig(num_virtual_tokens=P, seed=0))
    out = output_of(pm, inputs)
    assert out.shape == (2, 7 + P, 100)
    assert not torch.allclose(out[:, P:], base, atol=1e-4)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_padded_row_equals_row_alone(kind):
    """The mask is widened with ones for the prompt, so padding stays masked out."""
    pm = prompted(kind)
    inputs = make_inputs(kind)  # row 0 ends with two padding tokens
    padded = output_of(pm, inputs)[0]
    alone = output_of(pm, {"input_ids": inputs["input_ids"][:1, :5],
                           "attention_mask": torch.ones(1, 5, dtype=torch.long)})[0]
    if kind == "llama":
        padded = padded[:P + 5]
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_bert_token_type_ids_and_missing_mask():
    pm = prompted("bert")
    ids = make_inputs("bert")["input_ids"]
    plain = output_of(pm, {"input_ids": ids})
    with_types = output_of(pm, {"input_ids": ids, "token_type_ids": torch.zeros_like(ids),
                                "attention_mask": torch.ones_like(ids)})
    torch.testing.assert_close(plain, with_types)


def test_inputs_embeds_equal_input_ids():
    pm = prompted("llama")
    inputs = make_inputs("llama")
    embeds = pm.get_input_embeddings()(inputs["input_ids"])
    a = output_of(pm, inputs)
    b = output_of(pm, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
    torch.testing.assert_close(a, b)


def test_positional_input_ids():
    pm = prompted("llama")
    ids = make_inputs("llama")["input_ids"]
    torch.testing.assert_close(pm(ids).logits, pm(input_ids=ids).logits)


def test_two_prompts_prepend_in_turn():
    """set_active("a", "b"): "a" acts first (nearest the tokens), "b" goes in front of it."""
    pm = pa.wrap(make_model("llama"))
    pm.add_adapter("a", PromptConfig(num_virtual_tokens=2, seed=1))
    pm.add_adapter("b", PromptConfig(num_virtual_tokens=3, seed=2))
    pm.set_active("a", "b")
    inputs = make_inputs("llama")
    out = output_of(pm, inputs)
    assert out.shape == (2, 7 + 5, 100)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    a, b = pm.input_parts["a"].embeddings, pm.input_parts["b"].embeddings
    embeds = torch.cat([b.expand(2, -1, -1), a.expand(2, -1, -1), pm.get_input_embeddings()(ids)], dim=1)
    pm.set_active()
    manual = pm(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(2, 5, dtype=mask.dtype), mask], 1))
    torch.testing.assert_close(out, manual.logits)


def test_position_ids_refused():
    pm = prompted("llama")
    inputs = make_inputs("llama")
    with pytest.raises(PolyAdapterError, match="position_ids"):
        pm(**inputs, position_ids=torch.arange(7).expand(2, -1))


# ---------------------------------------------------------------- loss and training


def test_llama_loss_ignores_prompt_positions():
    pm = prompted("llama")
    inputs = make_inputs("llama")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = pm(**inputs, labels=labels)
    logits = out.logits
    assert logits.shape[1] == 7 + P
    # Position i predicts token i+1: the last virtual token predicts the first real one.
    manual = F.cross_entropy(logits[:, P - 1:-1].reshape(-1, 100).float(), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, manual)


def test_bert_class_labels_untouched():
    pm = prompted("bert")
    labels = torch.tensor([0, 2])
    out = pm(**make_inputs("bert"), labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))


def test_training_touches_only_prompt_and_head_copy():
    pm = pa.wrap(make_model("bert"))
    pm.add_adapter("p", PromptConfig(num_virtual_tokens=P, seed=0, modules_to_save=["classifier"]))
    base_before = {k: v.clone() for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    params = pm.train_adapter("p")
    named = pm.adapter_parameters("p")
    assert set(named) == {"input_embeddings.embeddings", "classifier.module.weight", "classifier.module.bias"}
    assert {id(p) for p in params} == {id(p) for p in pm.trainable_parameters()}
    opt = torch.optim.Adam(params, lr=1e-2)
    before = output_of(pm, make_inputs("bert"))
    out = pm(**make_inputs("bert"), labels=torch.tensor([0, 2]))
    out.loss.backward()
    for key, p in named.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key
    for n, p in pm.model.named_parameters():
        if ".adapters." not in n:
            assert p.grad is None, n
    opt.step()
    after = {k: v for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    assert base_before.keys() == after.keys()
    for k in base_before:
        assert torch.equal(base_before[k], after[k]), k
    assert not torch.allclose(output_of(pm.eval(), make_inputs("bert")), before)


# ---------------------------------------------------------------- generate


def test_generate_with_prompt():
    pm = prompted("llama")
    ids = make_inputs("llama")["input_ids"]
    new = pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                      pad_token_id=0)
    assert new.shape == (2, 3)  # only the new tokens come back when generating from embeddings
    first = pm(input_ids=ids).logits[:, -1].argmax(-1)
    assert torch.equal(new[:, 0], first)


# ---------------------------------------------------------------- state, files, init


def test_merge_refused():
    pm = prompted("bert")
    with pytest.raises(StateError, match="cannot be merged"):
        pm.merge_adapter("p")


def test_save_load_roundtrip(tmp_path):
    pm = pa.wrap(make_model("bert"))
    pm.add_adapter("p", PromptConfig(num_virtual_tokens=P, init="random", seed=3, modules_to_save=["classifier"]))
    with torch.no_grad():
        pm.parts("p")["classifier"].module.weight.add_(0.5)
    inputs = make_inputs("bert")
    want = output_of(pm, inputs)
    pm.save_adapter("p", tmp_path / "p")
    pm2 = pa.wrap(make_model("bert"))
    record = pm2.load_adapter(tmp_path / "p")
    assert isinstance(record.config, PromptConfig) and record.config.init == "random"
    assert torch.equal(output_of(pm2, inputs), want)
    assert torch.equal(pm2.input_parts["p"].embeddings, pm.input_parts["p"].embeddings)


def test_remove_adapter():
    pm = prompted("bert")
    pm.remove_adapter("p")
    assert "p" not in pm.input_parts and pm.adapters == []


def test_init_vocab_copies_embedding_rows():
    pm = prompted("bert", num_virtual_tokens=6)
    table = pm.get_input_embeddings().weight
    for row in pm.input_parts["p"].embeddings:
        assert (table == row).all(-1).any()


def test_init_tokens_repeats_ids():
    pm = prompted("bert", num_virtual_tokens=5, init="tokens", init_token_ids=[7, 9])
    table = pm.get_input_embeddings().weight
    assert torch.equal(pm.input_parts["p"].embeddings, table[[7, 9, 7, 9, 7]])
    pm = prompted("bert", num_virtual_tokens=2, init="tokens", init_token_ids=[3, 4, 5])
    assert torch.equal(pm.input_parts["p"].embeddings, table[[3, 4]])


def test_init_random_scale_and_seed():
    a = prompted("bert", num_virtual_tokens=50, init="random").input_parts["p"].embeddings
    b = prompted("bert", num_virtual_tokens=50, init="random").input_parts["p"].embeddings
    assert torch.equal(a, b)  # same seed, same prompt
    std = make_model("bert").get_input_embeddings().weight.std()
    assert 0.7 < (a.std() / std).item() < 1.3


def test_config_dict_roundtrip():
    cfg = PromptConfig(num_virtual_tokens=3, init="tokens", init_token_ids=[1, 2], seed=4)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, field", [
    ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
    ({"num_virtual_tokens": 2.5}, "num_virtual_tokens"),
    ({"init": "noise"}, "init"),
    ({"init": "tokens"}, "init_token_ids"),
    ({"init": "tokens", "init_token_ids": []}, "init_token_ids"),
    ({"init": "tokens", "init_token_ids": [1, -2]}, "init_token_ids"),
    ({"init_token_ids": [1, 2]}, "init_token_ids"),
    ({"seed": "x"}, "seed"),
    ({"targets": ["query"]}, "targets"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        PromptConfig(**kwargs)


def test_token_ids_beyond_vocab_refused_and_model_unchanged():
    pm = pa.wrap(make_model("bert"))
    with pytest.raises(ConfigError, match="init_token_ids"):
        pm.add_adapter("p", PromptConfig(init="tokens", init_token_ids=[5, 100]))
    assert pm.adapters == [] and len(pm.input_parts) == 0


@pytest.mark.parametrize("kind, cls", [("mlp", "TinyNet"), ("vit", "ViTForImageClassification")])
def test_models_without_token_embeddings_refused(kind, cls):
    pm = pa.wrap(make_model(kind))
    with pytest.raises(TargetError, match=cls):
        pm.add_adapter("p", PromptConfig(num_virtual_tokens=2))
    assert pm.adapters == []
