"""Sparse fine-tuning: trainable values at fixed weight positions, per model family."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import polyadapter as pa
from polyadapter import ConfigError, LoadError, SparseConfig
from polyadapter import config_from_dict
from polyadapter.sites import sites_of

from conftest import MLP_TARGETS, make_inputs, make_model, output_of

KINDS = ["bert", "llama", "gpt2", "mlp"]
DENSITY = 0.05


def config(kind: str, **kw) -> SparseConfig:
    kw.setdefault("density", DENSITY)
    return SparseConfig(targets=MLP_TARGETS if kind == "mlp" else None, **kw)


def with_sparse(kind: str, name: str = "s", **kw) -> pa.AdapterModel:
    pm = pa.wrap(make_model(kind))
    pm.add_adapter(name, config(kind, **kw))
    return pm


def perturb(pm: pa.AdapterModel, name: str = "s", seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in pm.parts(name).values():
            part.values.copy_(torch.randn(part.values.shape, generator=g) * 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_output_at_init(kind):
    pm = pa.wrap(make_model(kind))
    inputs = make_inputs(kind)
    base = output_of(pm, inputs)
    pm.add_adapter("s", config(kind))
    assert torch.equal(output_of(pm, inputs), base)


@pytest.mark.parametrize("kind", KINDS)
def test_stored_values_match_density(kind):
    pm = with_sparse(kind)
    sites = sites_of(pm.model)
    parts = pm.parts("s")
    assert parts and set(parts) == set(pm.record("s").sites)
    for site, part in parts.items():
        numel = sites[site].base.weight.numel()
        k = max(1, round(DENSITY * numel))
        assert part.values.shape == (k,) and part.indices.shape == (k,)
        assert part.indices.dtype == torch.int64
        assert torch.equal(part.indices, torch.unique(part.indices))  # sorted and unique
        assert 0 <= int(part.indices.min()) and int(part.indices.max()) < numel


@pytest.mark.parametrize("kind", KINDS)
def test_perturbing_values_changes_output(kind):
    pm = with_sparse(kind)
    inputs = make_inputs(kind)
    base = output_of(pm, inputs)
    perturb(pm)
    assert not torch.allclose(output_of(pm, inputs), base, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge(kind):
    pm = with_sparse(kind)
    inputs = make_inputs(kind)
    weights = {k: v.clone() for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    perturb(pm)
    unmerged = output_of(pm, inputs)
    pm.merge_adapter("s")
    assert pm.is_merged("s")
    torch.testing.assert_close(output_of(pm, inputs), unmerged, atol=1e-5, rtol=1e-5)
    pm.set_active()  # merged into the base: it now acts even when inactive
    torch.testing.assert_close(output_of(pm, inputs), unmerged, atol=1e-5, rtol=1e-5)
    pm.set_active("s")
    pm.unmerge_adapter("s")
    torch.testing.assert_close(output_of(pm, inputs), unmerged, atol=1e-5, rtol=1e-5)
    pm.set_active()
    for k, v in pm.model.state_dict().items():
        if ".adapters." not in k:
            torch.testing.assert_close(v, weights[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(kind, tmp_path):
    pm = with_sparse(kind, selection="magnitude")
    perturb(pm)
    inputs = make_inputs(kind)
    want = output_of(pm, inputs)
    pm.save_adapter("s", tmp_path / "s")
    pm2 = pa.wrap(make_model(kind))
    pm2.load_adapter(tmp_path / "s")
    assert torch.equal(output_of(pm2, inputs), want)
    for site, part in pm.parts("s").items():
        assert torch.equal(pm2.parts("s")[site].indices, part.indices)


@pytest.mark.parametrize("kind", KINDS)
def test_only_values_are_trainable(kind):
    pm = with_sparse(kind)
    params = pm.train_adapter("s")
    named = pm.adapter_parameters("s")
    assert named and all(k.endswith(".values") for k in named)
    assert {id(p) for p in params} == {id(p) for p in pm.trainable_parameters()}
    assert all(not b.requires_grad for b in (p.indices for p in pm.parts("s").values()))
    out = output_of(pm, make_inputs(kind))
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in named.values())
    assert all(p.grad is None for n, p in pm.model.named_parameters() if ".adapters." not in n)


def test_merged_weight_equals_dense_update():
    """Conv1D stores (in, out): the flat positions must address that layout, in apply and merge alike."""
    pm = with_sparse("gpt2")
    perturb(pm)
    sites = sites_of(pm.model)
    for site, part in pm.parts("s").items():
        w = sites[site].base.weight
        expect = w.detach().clone().view(-1)
        expect[part.indices] += part.values.detach()
        x = torch.randn(3, w.shape[0])
        got = part.apply(lambda t: t @ w + sites[site].base.bias, x)
        torch.testing.assert_close(got, x @ expect.view(w.shape) + sites[site].base.bias)


def test_magnitude_selection_takes_largest_entries():
    pm = with_sparse("mlp", selection="magnitude")
    sites = sites_of(pm.model)
    for site, part in pm.parts("s").items():
        mags = sites[site].base.weight.detach().abs().flatten()
        chosen = mags[part.indices]
        rest = mags[torch.ones_like(mags, dtype=torch.bool).index_fill_(0, part.indices, False)]
        assert chosen.min() >= rest.max()


def test_random_selection_reproducible_and_per_site():
    a = with_sparse("llama", seed=7).parts("s")
    b = with_sparse("llama", seed=7).parts("s")
    c = with_sparse("llama", seed=8).parts("s")
    assert all(torch.equal(a[s].indices, b[s].indices) for s in a)
    assert any(not torch.equal(a[s].indices, c[s].indices) for s in a)
    q0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    assert not torch.equal(a[q0].indices, a[q1].indices)  # same shape, different positions


def test_full_density():
    pm = with_sparse("mlp", density=1.0)
    for site, part in pm.parts("s").items():
        assert torch.equal(part.indices, torch.arange(part.numel))


def test_config_dict_roundtrip():
    cfg = SparseConfig(density=0.2, selection="magnitude", seed=3, targets=["fc1"])
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, field", [
    ({"density": 0}, "density"),
    ({"density": -0.1}, "density"),
    ({"density": 1.5}, "density"),
    ({"density": "0.1"}, "density"),
    ({"density": True}, "density"),
    ({"selection": "lottery"}, "selection"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_config(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        SparseConfig(**kwargs)


def _tamper(folder, fn):
    path = folder / "adapter.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if k.endswith(".indices"))[0]
    tensors[key] = fn(tensors[key].clone())
    save_file(tensors, str(path))
    return key


@pytest.mark.parametrize("problem, fn, match", [
    ("out of range", lambda t: t.index_fill_(0, torch.tensor([0]), 10**6), "out of range"),
    ("negative", lambda t: t.index_fill_(0, torch.tensor([0]), -1), "out of range"),
    ("duplicate", lambda t: t.index_fill_(0, torch.tensor([1]), int(t[0])), "repeat"),
])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tampered_indices_refused_model_unchanged(kind, problem, fn, match, tmp_path):
    pm = with_sparse(kind)
    perturb(pm)
    pm.save_adapter("s", tmp_path / "s")
    key = _tamper(tmp_path / "s", fn)
    target = pa.wrap(make_model(kind))
    target.add_adapter("other", config(kind, seed=5))
    perturb(target, "other")
    inputs = make_inputs(kind)
    before = output_of(target, inputs)
    sites_before = {n: list(s.adapters) for n, s in sites_of(target.model).items()}
    with pytest.raises(LoadError, match=match) as info:
        target.load_adapter(tmp_path / "s", name="loaded")
    assert repr(key.rsplit(".indices", 1)[0]) in str(info.value)  # names the site
    assert target.adapters == ["other"]
    assert {n: list(s.adapters) for n, s in sites_of(target.model).items()} == sites_before
    assert torch.equal(output_of(target, inputs), before)


def test_float_indices_refused(tmp_path):
    pm = with_sparse("mlp")
    pm.save_adapter("s", tmp_path / "s")
    _tamper(tmp_path / "s", lambda t: t.float())
    target = pa.wrap(make_model("mlp"))
    with pytest.raises(LoadError, match="dtype"):
        target.load_adapter(tmp_path / "s")
    assert target.adapters == []


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

if given is not None:
    _MLP = make_model("mlp")

    @settings(max_examples=15, deadline=None)
    @given(density=st.floats(min_value=1e-4, max_value=1.0), seed=st.integers(0, 2**31),
           selection=st.sampled_from(["random", "magnitude"]))
    def test_merge_then_unmerge_is_identity(density, seed, selection):
        base = {k: v.clone() for k, v in _MLP.state_dict().items()}
        pm = pa.wrap(_MLP)
        try:
            pm.add_adapter("s", SparseConfig(targets=MLP_TARGETS, density=density, seed=seed, selection=selection))
            perturb(pm, seed=seed % 1000)
            for part in pm.parts("s").values():
                assert torch.equal(part.indices, torch.unique(part.indices))
            pm.merge_adapter("s")
            pm.unmerge_adapter("s")
            after = pm.unwrap().state_dict()
            for k, v in base.items():
                torch.testing.assert_close(after[k], v, atol=1e-5, rtol=1e-5)
        finally:
            pm.unwrap()  # a no-op unless the test failed midway
            _MLP.load_state_dict(base)
