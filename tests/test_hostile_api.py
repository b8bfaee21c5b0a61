"""Hostile use of the Python API: bad names, merge/unmerge sequences with repeated and
unknown names, installs that fail half-way, merges that overflow, composition values
that make no sense. Each refusal is a PolyAdapterError and changes nothing."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_snapshot, make_inputs, make_model, output_of, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polyadapter as pa
from polyadapter import model as model_mod
from polyadapter.names import RESERVED


@pytest.fixture(scope="module")
def base():
    return make_model("bert")


def three_loras(base, seed: int = 0) -> pa.AdapterModel:
    pm = pa.AdapterModel(copy.deepcopy(base))
    g = torch.Generator().manual_seed(seed)
    for name in ("a", "b", "c"):
        pm.add_adapter(name, pa.LoraConfig(r=2, targets=["query", "value"]), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.set_active("a")
    return pm


# ---------------------------------------------------------------------- names
BAD_NAMES = ["", "a" * 65, "has.dot", "a/b", "a b", "tab\t", "new\nline", "ädapter", "名前", "１２", "a\u200bb",
             "../x", None, 3, b"bytes", ["a"]] + ["training", "forward", "keys", "to", "update", "pop", "__init__",
                                                 "_modules", "T_destination"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_everywhere(base, tmp_path, name):
    pm = three_loras(base)
    folder = pm.save_adapter("a", tmp_path / "a")
    before = snapshot(pm)
    with pytest.raises(pa.AdapterNameError):
        pm.add_adapter(name, pa.LoraConfig(r=2, targets=["query"]))
    with pytest.raises(pa.AdapterNameError):
        pm.add_adapter(name, pa.PromptConfig(num_virtual_tokens=2))
    with pytest.raises(pa.AdapterNameError):
        pm.load_adapter(folder, name=name)
    assert_same_snapshot(before, snapshot(pm))


def test_every_reserved_word_is_refused_and_ordinary_names_work(base):
    pm = three_loras(base)
    before = snapshot(pm)
    for name in sorted(RESERVED):
        with pytest.raises(pa.AdapterNameError, match="reserved"):
            pm.add_adapter(name, pa.IA3Config())
    assert_same_snapshot(before, snapshot(pm))
    for name in ("default", "train-2", "A_b-9", "x" * 64, "-", "_"):
        pm.add_adapter(name, pa.IA3Config(), activate=False)
    assert set(pm.adapters) >= {"default", "train-2", "-", "_"}


# ---------------------------------------------------------------------- merge / unmerge
def test_unmerge_with_a_repeated_name_changes_nothing(base):
    pm = three_loras(base)
    pm.merge_adapter("a")
    before = snapshot(pm)
    with pytest.raises(pa.StateError, match="'a' appears twice"):
        pm.unmerge_adapter("a", "a")
    with pytest.raises(pa.StateError, match="appears twice"):
        pm.merge_adapter("b", "b")
    with pytest.raises(pa.StateError, match="'b' is not merged"):
        pm.unmerge_adapter("a", "b")
    with pytest.raises(pa.AdapterNameError):
        pm.unmerge_adapter("a", "zz")
    assert_same_snapshot(before, snapshot(pm))


OPS = st.lists(st.tuples(st.sampled_from(["merge", "unmerge"]),
                         st.lists(st.sampled_from(["a", "b", "c", "zz"]), min_size=0, max_size=4)),
               min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_merge_unmerge_sequences_are_all_or_nothing(base, ops):
    pm = three_loras(base)
    x = make_inputs("bert")
    pm.set_active()
    reference = {}
    for names in (("a",), ("b",), ("c",)):
        pm.set_active(*names)
        reference[names] = output_of(pm, x)
    original = {k: v.clone() for k, v in pm.model.state_dict().items()}
    for verb, names in ops:
        before = snapshot(pm)
        try:
            getattr(pm, f"{verb}_adapter")(*names)
        except pa.PolyAdapterError:
            assert_same_snapshot(before, snapshot(pm))
    merged = sorted(pm.state.merged)
    if merged:
        pm.unmerge_adapter(*merged)
    assert not pm.state.merged
    for k, v in pm.model.state_dict().items():  # back to the base within float rounding
        assert torch.allclose(v, original[k], atol=1e-5), k
    pm.set_active("b")
    assert torch.allclose(output_of(pm, x), reference[("b",)], atol=1e-4)


def test_merge_that_overflows_is_undone_bit_for_bit(base):
    pm = three_loras(base)
    with torch.no_grad():
        for p in pm.adapter_parameters("b").values():
            p.fill_(1e30)  # finite, but B @ A overflows float32
    before = snapshot(pm)
    with pytest.raises(pa.StateError, match="non-finite weights"):
        pm.merge_adapter("a", "b")  # the default merge checks too, and "a" is undone with it
    assert_same_snapshot(before, snapshot(pm))


def test_a_merge_failing_half_way_restores_every_weight(base, monkeypatch):
    pm = three_loras(base)
    before = snapshot(pm)
    part = pm.parts("b")["bert.encoder.layer.1.attention.self.value"]
    monkeypatch.setattr(type(part), "merge", _fail_on(part, type(part).merge))
    with pytest.raises(RuntimeError, match="injected"):
        pm.merge_adapter("a", "b")
    assert_same_snapshot(before, snapshot(pm))


def _fail_on(target, original):
    def merge(self, base):
        if self is target:
            raise RuntimeError("injected failure")
        return original(self, base)
    return merge


# ---------------------------------------------------------------------- installs failing half-way
@pytest.mark.parametrize("fail_at", [0, 1, 3])
def test_an_install_failing_half_way_is_rolled_back(base, monkeypatch, fail_at):
    pm = three_loras(base)
    pm.add_adapter("p", pa.PromptConfig(num_virtual_tokens=2), activate=False)
    before = snapshot(pm)
    calls = {"n": 0}
    real = model_mod.wrap_site

    def flaky(model, site, state):
        if calls["n"] == fail_at:
            raise RuntimeError("injected failure")
        calls["n"] += 1
        return real(model, site, state)

    monkeypatch.setattr(model_mod, "wrap_site", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        pm.add_adapter("new", pa.IA3Config(modules_to_save=["classifier"]))
    assert_same_snapshot(before, snapshot(pm))
    monkeypatch.setattr(model_mod, "wrap_site", real)
    pm.add_adapter("new", pa.IA3Config(modules_to_save=["classifier"]))  # works afterwards
    assert "new" in pm.adapters


# ---------------------------------------------------------------------- composition values
@pytest.mark.parametrize("make", [
    lambda: pa.Average("a", "b", weights=[float("nan"), 1.0]),
    lambda: pa.Average("a", "b", weights=[float("inf"), 1.0]),
    lambda: pa.Average("a", "b", weights=["x", 1.0]),
    lambda: pa.Average("a", "b", weights=[None, 1.0]),
    lambda: pa.Average("a", "b", weights=[True, 1.0]),
    lambda: pa.Average("a", "b", weights=0.5),
    lambda: pa.BatchSplit("a", "b", batch_sizes=[1.5, 0.5]),
    lambda: pa.BatchSplit("a", "b", batch_sizes=[-1, 3]),
    lambda: pa.BatchSplit("a", "b", batch_sizes=["1", 1]),
    lambda: pa.BatchSplit("a", "b", batch_sizes=[True, 1]),
], ids=range(10))
def test_senseless_composition_values_are_refused(make):
    with pytest.raises(pa.ConfigError):
        make()


@pytest.mark.parametrize("config", [
    {"method": "fusion", "adapters": ["a", "b"], "temperature": 1e-300},
    {"method": "fusion", "adapters": ["a", "b"], "temperature": 0.0},
    {"method": "arrow", "library": ["a", "b"], "temperature": 1e-30},
    {"method": "lora", "alpha": 1e300},
    {"method": "lora", "alpha_pattern": {"query": 1e300}},
    {"method": "bottleneck", "scale": 1e300},
    {"method": "bottleneck", "reduction_factor": 0.0},
    {"method": "sparse", "density": 0.0},
    {"method": "sparse", "density": float("nan")},
])
def test_values_that_would_give_nan_or_inf_outputs_are_refused(base, config):
    pm = three_loras(base)
    before = snapshot(pm)
    with pytest.raises(pa.ConfigError):
        pm.add_adapter("x", config)
    assert_same_snapshot(before, snapshot(pm))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weights=st.lists(st.floats(-1e6, 1e6), min_size=2, max_size=2),
       temperature=st.floats(1e-3, 1e9))
def test_accepted_composition_values_give_finite_outputs(base, weights, temperature):
    pm = three_loras(base)
    pm.add_adapter("f", {"method": "fusion", "adapters": ["a", "b"], "temperature": temperature}, activate=False)
    x = make_inputs("bert")
    for setup in (pa.Average("a", "b", weights=weights), pa.Fuse("a", "b")):
        pm.set_active(setup)
        assert torch.isfinite(output_of(pm, x)).all()
