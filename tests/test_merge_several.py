"""Merging several adapters into the base at once, all or nothing, and back out."""
from __future__ import annotations

import pytest
import torch
from conftest import make_inputs, make_model, output_of

import polyadapter as pa


def _model():
    pm = pa.AdapterModel(make_model("llama"))
    g = torch.Generator().manual_seed(0)
    for name, cfg in {"a": pa.LoraConfig(r=4), "b": pa.LoraConfig(r=2, targets=["all-linear"]),
                      "c": pa.IA3Config(), "d": pa.SparseConfig(density=0.1)}.items():
        pm.add_adapter(name, cfg, activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.eval()
    return pm


def test_merging_several_equals_their_stack_and_unmerges_back():
    pm = _model()
    x = make_inputs("llama")
    base = {k: v.clone() for k, v in pm.model.state_dict().items()}
    pm.set_active("a", "b", "c", "d")
    with torch.no_grad():
        stacked = output_of(pm, x)
    pm.merge_adapter("a", "b", "c", "d", safe=True)
    pm.set_active(None)
    with torch.no_grad():
        merged = output_of(pm, x)
    assert torch.allclose(merged, stacked, atol=1e-4)
    pm.unmerge_adapter("a", "b", "c", "d")
    for k, v in pm.model.state_dict().items():
        assert torch.allclose(v, base[k], atol=1e-5), k


def test_one_bad_adapter_merges_none():
    pm = _model()
    pm.add_adapter("bn", pa.BottleneckConfig(), activate=False)
    before = {k: v.clone() for k, v in pm.model.state_dict().items()}
    with pytest.raises(pa.StateError, match="'bn'.*cannot be merged"):
        pm.merge_adapter("a", "bn")
    assert not pm.state.merged
    assert all(torch.equal(v, before[k]) for k, v in pm.model.state_dict().items())


def test_safe_merge_refuses_when_the_sum_overflows():
    pm = _model()
    with torch.no_grad():
        for name in ("a", "b"):
            for k, p in pm.adapter_parameters(name).items():
                p.fill_(1e20)
    before = {k: v.clone() for k, v in pm.model.state_dict().items()}
    with pytest.raises(pa.StateError, match="non-finite.*nothing merged"):
        pm.merge_adapter("a", "b", safe=True)
    assert all(torch.equal(v, before[k]) for k, v in pm.model.state_dict().items())


def test_merge_and_unload_bakes_adapters_and_heads_into_a_plain_model():
    pm = pa.AdapterModel(make_model("bert"))
    pm.add_adapter("a", pa.LoraConfig(r=4, modules_to_save=["classifier"]), activate=False)
    pm.add_adapter("b", pa.IA3Config(), activate=False)
    with torch.no_grad():
        for name in ("a", "b"):
            for p in pm.adapter_parameters(name).values():
                p.add_(0.1 * torch.randn_like(p))
    pm.eval()
    x = make_inputs("bert")
    pm.set_active("a", "b")
    with torch.no_grad():
        want = output_of(pm, x)
    model = pm.merge_and_unload("a", "b")
    assert not isinstance(model, pa.AdapterModel) and pm.adapters == []
    assert not any(type(m).__name__ == "Site" for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(output_of(model, x), want, atol=1e-5)
