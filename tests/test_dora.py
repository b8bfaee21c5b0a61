"""DoRA: parity with PEFT itself (outputs, files both ways, merged weights) on Linear
and Conv1D layers; training; merge/unmerge; the norm cache; mixed batches batched like
LoRA (one bank per shape, never one adapter at a time)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import assert_same_snapshot, make_inputs, make_model, output_of, snapshot
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import polyadapter as pa
from polyadapter.methods.lora import LoraPart

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "mlp.c_proj"]}


def randomize(module, names=("lora_A", "lora_B", "lora_magnitude"), seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if any(k in n for k in names):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_dora(kind, seed=0, r=4, alpha=8):
    base = make_model(kind)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS[kind],
                                                                  use_dora=True))
    randomize(peft_model, seed=seed)
    return base, peft_model.eval()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_peft_dora_file_loads_with_the_same_outputs(kind, tmp_path):
    base, peft_model = peft_dora(kind)
    peft_model.save_pretrained(tmp_path / "peft")
    pm = pa.AdapterModel(copy.deepcopy(base))
    record = pm.load_adapter(tmp_path / "peft", name="d")
    assert record.config.use_dora
    x = make_inputs(kind)
    with torch.no_grad():
        ours, theirs = output_of(pm, x), output_of(peft_model, x)
    assert (ours - theirs).abs().max() < 1e-5
    assert (ours - output_of(base, x)).abs().max() > 1e-3  # the adapter does change the output


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_our_dora_exported_to_peft_gives_the_same_outputs(kind, tmp_path):
    base = make_model(kind)
    pm = pa.AdapterModel(copy.deepcopy(base))
    pm.add_adapter("d", pa.LoraConfig(r=4, alpha=8, targets=TARGETS[kind], use_dora=True))
    randomize(pm.model)
    folder = pm.save_adapter("d", tmp_path / "peft", format="peft")
    assert json.loads((folder / "adapter_config.json").read_text())["use_dora"] is True
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    x = make_inputs(kind)
    with torch.no_grad():
        assert (output_of(pm, x) - output_of(theirs, x)).abs().max() < 1e-5
    back = pa.AdapterModel(copy.deepcopy(base))
    back.load_adapter(tmp_path / "peft", name="d")  # and our own PEFT file reads back
    native = pm.save_adapter("d", tmp_path / "native")
    again = pa.AdapterModel(copy.deepcopy(base))
    again.load_adapter(native)
    with torch.no_grad():
        assert torch.equal(output_of(again, x), output_of(pm, x))
        assert (output_of(back, x) - output_of(pm, x)).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merged_weights_match_peft_merge_and_unload(kind, tmp_path):
    base, peft_model = peft_dora(kind, seed=3)
    peft_model.save_pretrained(tmp_path / "peft")
    pm = pa.AdapterModel(copy.deepcopy(base))
    pm.load_adapter(tmp_path / "peft", name="d")
    x = make_inputs(kind)
    with torch.no_grad():
        before = output_of(pm, x)
    merged_ours = pm.merge_and_unload("d").state_dict()
    merged_peft = peft_model.merge_and_unload().state_dict()
    assert merged_ours.keys() == merged_peft.keys()
    worst = max((merged_ours[k] - merged_peft[k]).abs().max().item() for k in merged_ours)
    assert worst < 1e-5
    base.load_state_dict(merged_ours)  # a plain model with the merged weights computes the same
    with torch.no_grad():
        assert (output_of(base, x) - before).abs().max() < 1e-5


def test_merge_unmerge_round_trip_and_outputs():
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("d", pa.LoraConfig(r=4, targets=TARGETS["llama"], use_dora=True))
    randomize(pm.model)
    original = {k: v.clone() for k, v in pm.model.state_dict().items() if "adapters" not in k}
    x = make_inputs("llama")
    with torch.no_grad():
        unmerged = output_of(pm, x)
        pm.merge_adapter("d")
        merged = output_of(pm, x)
        pm.unmerge_adapter("d")
        again = output_of(pm, x)
    assert (merged - unmerged).abs().max() < 1e-5 and (again - unmerged).abs().max() < 1e-5
    now = {k: v for k, v in pm.model.state_dict().items() if "adapters" not in k}
    assert all(torch.allclose(now[k], original[k], atol=1e-6) for k in original)


def test_starts_at_the_base_and_trains_magnitude_and_direction():
    base = make_model("llama")
    reference = copy.deepcopy(base)
    pm = pa.AdapterModel(base)
    pm.add_adapter("d", pa.LoraConfig(r=4, targets=TARGETS["llama"], use_dora=True))
    x = make_inputs("llama")
    with torch.no_grad():
        assert (output_of(pm, x) - output_of(reference, x)).abs().max() < 1e-5  # m = ||W|| at the start
    others = {k: v.clone() for k, v in pm.model.state_dict().items() if ".d." not in k}
    params = pm.train_adapter("d")
    opt = torch.optim.SGD(params, lr=0.05)
    labels = x["input_ids"]
    losses = []
    for _ in range(5):
        loss = pm(**x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        mags = [p for n, p in pm.adapter_parameters("d").items() if n.endswith("lora_magnitude")]
        assert mags and all(p.grad is not None and p.grad.abs().sum() > 0 for p in mags)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, pm.model.state_dict()[k]) for k, v in others.items())  # base untouched


def test_norm_is_cached_for_inference_and_follows_weight_changes():
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("d", pa.LoraConfig(r=4, targets=["q_proj"], use_dora=True))
    randomize(pm.model)
    part = next(iter(pm.parts("d").values()))
    calls = {"n": 0}
    real = torch.linalg.norm

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    x = make_inputs("llama")
    torch.linalg.norm = counting
    try:
        with torch.no_grad():
            first = output_of(pm, x)
            n_first = calls["n"]
            second = output_of(pm, x)
            assert calls["n"] == n_first and torch.equal(first, second)  # cached: no new norms
            part.lora_B.add_(0.5)                                       # weights change in place
            third = output_of(pm, x)
            assert calls["n"] > n_first and not torch.allclose(third, second)
    finally:
        torch.linalg.norm = real


def test_mixed_batch_dora_rows_share_one_bank_call_per_site(monkeypatch):
    pm = pa.AdapterModel(make_model("llama"))
    for i, name in enumerate(["d1", "d2", "d3"]):
        pm.add_adapter(name, pa.LoraConfig(r=2, alpha=2 + i, targets=["q_proj"], use_dora=True), activate=False)
    pm.add_adapter("l", pa.LoraConfig(r=2, targets=["q_proj"]), activate=False)
    randomize(pm.model)
    calls = []
    real = LoraPart._bank_dora
    monkeypatch.setattr(LoraPart, "_bank_dora", staticmethod(lambda *a: calls.append(1) or real(*a)))
    x = {k: torch.cat([v] * 3) for k, v in make_inputs("llama").items()}  # 6 rows
    x["attention_mask"] = torch.ones_like(x["attention_mask"])
    setups = ["d1", "d2", "d3", "l", None, "d1"]
    with torch.no_grad():
        mixed = output_of(pm, {**x, "adapter_names": setups})
    assert len(calls) == 2  # one call per site (two layers), for all three DoRA adapters together
    with torch.no_grad():
        for i, setup in enumerate(setups):
            pm.set_active(setup)
            alone = output_of(pm, {k: v[i:i + 1] for k, v in x.items()})
            assert (mixed[i:i + 1] - alone).abs().max() < 1e-5


def test_dora_refusals_change_nothing(tmp_path):
    pm = pa.AdapterModel(make_model("llama"))
    pm.add_adapter("l", pa.LoraConfig(r=2, targets=["q_proj"]))
    before = snapshot(pm)
    with pytest.raises(pa.ConfigError, match="Embedding"):
        pm.add_adapter("e", pa.LoraConfig(r=2, targets=["embed_tokens"], use_dora=True))
    with pytest.raises(pa.ConfigError, match="pissa"):
        pa.LoraConfig(use_dora=True, init="pissa")
    assert_same_snapshot(before, snapshot(pm))
    pm.add_adapter("d", pa.LoraConfig(r=2, targets=["q_proj"], use_dora=True), activate=False)
    from polyadapter.ops.combine import combine
    with pytest.raises(pa.ConfigError, match="DoRA"):
        combine(pm, "c", ["l", "d"], [0.5, 0.5], "linear")
    # A PEFT DoRA file without its magnitudes does not fit its config.
    base, peft_model = peft_dora("llama")
    peft_model.save_pretrained(tmp_path / "p")
    from safetensors.torch import load_file, save_file
    f = tmp_path / "p" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "magnitude" not in k}, str(f))
    fresh = pa.AdapterModel(copy.deepcopy(base))
    before = snapshot(fresh)
    with pytest.raises(pa.LoadError, match="lora_magnitude_vector"):
        fresh.load_adapter(tmp_path / "p")
    assert_same_snapshot(before, snapshot(fresh))
