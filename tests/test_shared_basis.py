"""Shared-basis compression of many LoRAs (``basis`` + ``basis_lora`` adapters,
``compress_to_shared_basis``): exactness at full rank, error falling with the rank,
mixed batches without a per-adapter loop, native files, and clear refusals."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_model
from safetensors.torch import load_file
from test_mixed import assert_rows_match_alone, full_inputs

import polyadapter as pa
from polyadapter.compose import Stack
from polyadapter.methods.basis import BasisLoraConfig, BasisLoraPart, BasisPart
from polyadapter.ops.factors import lora_factors
from polyadapter.ops.shared_basis import compress_to_shared_basis, fit_shared_basis
from polyadapter.sites import sites_of

TARGETS = {"llama": ["all-linear", "embed_tokens"], "gpt2": ["c_attn", "c_proj", "wte"]}


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def with_loras(kind: str, ranks=(4, 2, 6), seed: int = 0, plain: bool = True) -> pa.AdapterModel:
    """A tiny model with LoRAs ``l0, l1, ...`` (random non-zero updates) on the same
    sites, and, with ``plain``, one more LoRA ``plain`` that is not compressed."""
    pm = pa.AdapterModel(make_model(kind))
    g = torch.Generator().manual_seed(seed)
    names = [f"l{i}" for i in range(len(ranks))] + (["plain"] if plain else [])
    for name, r in zip(names, list(ranks) + [3]):
        pm.add_adapter(name, pa.LoraConfig(r=r, targets=TARGETS[kind]), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return pm


def outputs(pm, kind, setup, inputs):
    pm.set_active(setup)
    with torch.no_grad():
        return _logits(pm(**inputs))


# ---------------------------------------------------------------------- fitting
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_rank_equal_to_the_sum_of_source_ranks_reproduces_the_sources(kind):
    pm = with_loras(kind)
    sources = ["l0", "l1", "l2"]
    summary = compress_to_shared_basis(pm, sources, "B", rank=12)
    assert summary["adapters"] == {n: n + "-jd" for n in sources}
    assert all(e < 1e-6 for e in summary["relative_errors"].values()), summary["relative_errors"]
    inputs = full_inputs(kind, 2)
    for n in sources:
        want = outputs(pm, kind, n, inputs)
        got = outputs(pm, kind, n + "-jd", inputs)
        assert torch.allclose(got, want, atol=1e-5), (n, (got - want).abs().max().item())
    # per-site width min(rank, in, out, sum of ranks); asking for more changes nothing
    assert set(summary["ranks"].values()) == {12}
    wide = compress_to_shared_basis(pm, sources, "W", rank=1000, suffix="-w")
    assert wide["ranks"] == summary["ranks"]
    # provenance and bookkeeping
    record = pm.record("l0-jd")
    assert record.config.basis == "B" and record.config.basis_id == pm.record("B").config.basis_id
    prov = record.provenance
    assert prov["operation"] == "compress" and prov["method"] == "shared_basis"
    assert prov["sources"] == sources and prov["rank"] == 12 and prov["source"] == "l0"
    assert prov["storage_ratio"] == pytest.approx(summary["storage_ratio"])
    src = sum(t.numel() * 4 for n in sources for t in pm.adapter_state_dict(n).values())
    basis = sum(t.numel() * 4 for t in pm.adapter_state_dict("B").values())
    sig = sum(t.numel() * 4 for n in sources for t in pm.adapter_state_dict(n + "-jd").values())
    assert summary["storage_ratio"] == pytest.approx(src / (basis + sig))
    # the basis exists once: the compressed adapters own only their sigma matrices
    assert all(k.endswith(".sigma") for k in pm.adapter_state_dict("l0-jd"))
    assert all(p.shape == (12, 12) for p in pm.adapter_parameters("l0-jd").values())


def test_error_falls_as_the_rank_grows():
    pm = with_loras("llama", ranks=(4, 4, 4, 4), plain=False)
    sources = ["l0", "l1", "l2", "l3"]
    errors, ratios = [], []
    for k in (1, 2, 4, 8, 12, 16):
        s = compress_to_shared_basis(pm, sources, f"B{k}", rank=k, suffix=f"-{k}", refine_steps=0)
        errors.append(s["relative_errors"])
        ratios.append(s["storage_ratio"])
    # without refinement U, V for rank k are nested in those for k + 1: every adapter improves
    for small, big in zip(errors, errors[1:]):
        assert all(big[n] < small[n] for n in sources), (small, big)
    assert all(e < 1e-6 for e in errors[-1].values())
    assert ratios == sorted(ratios, reverse=True) and ratios[1] > 1  # small bases save storage
    # refinement only lowers the total error, at every rank
    factors = [lora_factors(pm, n)["model.layers.0.self_attn.q_proj"] for n in sources]
    for k in (1, 3, 6, 10):
        totals = [float(fit_shared_basis(factors, k, steps)[3].sum()) for steps in (0, 1, 2, 4)]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(totals, totals[1:])), (k, totals)
    refined = [float(fit_shared_basis(factors, k, 2)[3].sum()) for k in (1, 2, 4, 8, 12)]
    assert refined == sorted(refined, reverse=True)


def test_fit_never_forms_a_full_update_and_sigma_is_the_projection():
    pm = with_loras("llama", plain=False)
    factors = [lora_factors(pm, n)["model.layers.1.mlp.down_proj"] for n in ("l0", "l1", "l2")]
    U, V, sigmas, err2, norm2 = fit_shared_basis(factors, 5)
    assert U.shape == (32, 5) and V.shape == (64, 5) and sigmas.shape == (3, 5, 5)
    assert torch.allclose(U.T @ U, torch.eye(5, dtype=U.dtype), atol=1e-10)
    assert torch.allclose(V.T @ V, torch.eye(5, dtype=V.dtype), atol=1e-10)
    for f, s, e2, d2 in zip(factors, sigmas, err2, norm2):
        delta = f.delta().double()
        assert torch.allclose(s, U.T @ delta @ V, atol=1e-6)
        assert float(e2) == pytest.approx(float((delta - U @ s @ V.T).pow(2).sum()), rel=1e-6)
        assert float(d2) == pytest.approx(float(delta.pow(2).sum()), rel=1e-6)


# ---------------------------------------------------------------------- mixed batches
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_mixed_batch_of_compressed_adapters_equals_each_row_alone(kind):
    pm = with_loras(kind)
    compress_to_shared_basis(pm, ["l0", "l1", "l2"], "B", rank=6)
    setups = ["l0-jd", "l1-jd", None, "plain", "l2-jd", "l0-jd", Stack("plain", "l1-jd"), "l0"]
    assert_rows_match_alone(pm, kind, setups)
    assert_rows_match_alone(pm, kind, ["l2-jd", "l0-jd", "l1-jd"])   # every row in the bank


def test_bfloat16_base_stores_the_basis_in_bfloat16_and_reports_its_rounding():
    pm = pa.AdapterModel(make_model("llama").to(torch.bfloat16))
    for i in range(3):
        pm.add_adapter(f"l{i}", pa.LoraConfig(r=4, targets=["all-linear"]), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(f"l{i}").values():
                p.add_(0.1 * torch.randn_like(p))
    s = compress_to_shared_basis(pm, ["l0", "l1", "l2"], "B", rank=12)
    assert all(t.dtype == torch.bfloat16 for t in pm.adapter_state_dict("B").values())
    assert all(s["fit_relative_errors"][n] < 1e-6 < s["relative_errors"][n] < 2e-2 for n in s["adapters"])
    assert_rows_match_alone(pm, "llama", ["l0-jd", None, "l1-jd", "l2-jd", "l0"], atol=0.05)


def test_mixed_path_runs_one_bank_call_per_site_whatever_the_adapter_count(monkeypatch):
    """No loop over adapters: one bank call per site (x V and (.) U^T shared by every
    row, the rows' Sigma gathered into one bmm), for 2 distinct adapters as for 12."""
    pm = pa.AdapterModel(make_model("llama"))
    g = torch.Generator().manual_seed(5)
    for i in range(12):
        pm.add_adapter(f"a{i}", pa.LoraConfig(r=2, targets=["all-linear"]), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(f"a{i}").values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    compress_to_shared_basis(pm, [f"a{i}" for i in range(12)], "B", rank=8)
    n_sites = len(pm.record("a0-jd").sites)
    calls = {"bank": 0, "apply": 0, "delta": 0}
    real_bank, real_apply = BasisLoraPart.bank_forward, BasisLoraPart.apply

    def bank(*a, **k):
        calls["bank"] += 1
        return real_bank(*a, **k)

    def apply(self, inner, x):
        calls["apply"] += 1
        return real_apply(self, inner, x)

    monkeypatch.setattr(BasisLoraPart, "bank_forward", staticmethod(bank))
    monkeypatch.setattr(BasisLoraPart, "apply", apply)
    monkeypatch.setattr(BasisLoraPart, "delta", lambda *a: calls.__setitem__("delta", calls["delta"] + 1))
    inputs = full_inputs("llama", 12)
    for distinct in (2, 12):
        calls.update(bank=0, apply=0, delta=0)
        with torch.no_grad():
            pm(**inputs, adapter_names=[f"a{i % distinct}-jd" for i in range(12)])
        assert calls == {"bank": n_sites, "apply": 0, "delta": 0}, (distinct, calls)
    monkeypatch.undo()
    assert_rows_match_alone(pm, "llama", [f"a{i}-jd" for i in range(12)])


def test_mixed_batch_gradients_reach_each_rows_sigma():
    pm = with_loras("llama", plain=False)
    compress_to_shared_basis(pm, ["l0", "l1", "l2"], "B", rank=6)
    params = {n: pm.adapter_parameters(n) for n in ("l0-jd", "l1-jd")}
    for ps in params.values():
        for p in ps.values():
            p.requires_grad_(True)
    setups = ["l0-jd", "l1-jd", None, "l0-jd"]
    inputs = full_inputs("llama", 4)
    _logits(pm(**inputs, adapter_names=setups)).pow(2).sum().backward()
    mixed = {n: {k: p.grad.clone() for k, p in ps.items()} for n, ps in params.items()}
    pm.zero_grad(set_to_none=False)
    for i, s in enumerate(setups):
        if s is not None:
            pm.set_active(s)
            _logits(pm(**{k: v[i:i + 1] for k, v in inputs.items()})).pow(2).sum().backward()
    for n, ps in params.items():
        assert any(g.abs().sum() > 0 for g in mixed[n].values())
        for k, p in ps.items():
            assert torch.allclose(mixed[n][k], p.grad, atol=1e-5), (n, k)
    assert all(p.grad is None for p in pm.adapter_parameters("B").values())  # U, V are buffers


# ---------------------------------------------------------------------- files
def test_native_round_trip_of_basis_and_sigmas(tmp_path):
    pm = with_loras("gpt2")
    summary = compress_to_shared_basis(pm, ["l0", "l1", "l2"], "B", rank=5)
    pm.save_adapter("B", tmp_path / "B")
    for n in summary["adapters"].values():
        pm.save_adapter(n, tmp_path / n)
    # the basis is stored once; each compressed adapter stores only sigma and the basis's name
    assert {k.rsplit(".", 1)[1] for k in load_file(tmp_path / "B" / "adapter.safetensors")} == {"U", "V"}
    assert {k.rsplit(".", 1)[1] for k in load_file(tmp_path / "l1-jd" / "adapter.safetensors")} == {"sigma"}
    meta = json.loads((tmp_path / "l1-jd" / "polyadapter.json").read_text())
    assert meta["config"]["basis"] == "B" and meta["provenance"]["source"] == "l1"

    fresh = pa.AdapterModel(make_model("gpt2"))
    fresh.load_adapter(tmp_path / "B", activate=False)
    for n in summary["adapters"].values():
        fresh.load_adapter(tmp_path / n, activate=False)
    inputs = full_inputs("gpt2", 3)
    names = list(summary["adapters"].values())
    for n in names:
        assert torch.equal(outputs(fresh, "gpt2", n, inputs), outputs(pm, "gpt2", n, inputs)), n
        assert fresh.record(n).provenance == pm.record(n).provenance
    with torch.no_grad():
        a = _logits(fresh(**inputs, adapter_names=names))
        b = _logits(pm(**inputs, adapter_names=names))
    assert torch.allclose(a, b, atol=1e-6)


def _snapshot(pm):
    return (pm.adapters, sorted(sites_of(pm.model)), {k: v.clone() for k, v in pm.model.state_dict().items()})


def _same(a, b):
    return a[0] == b[0] and a[1] == b[1] and a[2].keys() == b[2].keys() and all(
        torch.equal(a[2][k], b[2][k]) for k in a[2])


def test_loading_a_basis_lora_without_its_basis_is_refused_and_changes_nothing(tmp_path):
    pm = with_loras("llama", plain=False)
    compress_to_shared_basis(pm, ["l0", "l1", "l2"], "B", rank=4)
    pm.save_adapter("l0-jd", tmp_path / "l0-jd")
    pm.save_adapter("B", tmp_path / "B")

    other = with_loras("llama", plain=False)
    before = _snapshot(other)
    with pytest.raises(pa.ConfigError, match="basis adapter 'B' is not in this model; add or load the basis"):
        other.load_adapter(tmp_path / "l0-jd")
    assert _same(before, _snapshot(other))
    # a basis of the same name and shapes but fitted elsewhere is refused too
    compress_to_shared_basis(other, ["l2", "l1", "l0"], "B", rank=4, suffix="-x")
    before = _snapshot(other)
    with pytest.raises(pa.ConfigError, match="fitted against basis"):
        other.load_adapter(tmp_path / "l0-jd")
    assert _same(before, _snapshot(other))
    # a non-basis adapter named as the basis is refused
    with pytest.raises(pa.ConfigError, match="is a lora adapter, not a basis"):
        other.add_adapter("bad", BasisLoraConfig(basis="l0"))
    # targets outside the basis are refused
    with pytest.raises(pa.ConfigError, match="no part at site"):
        other.add_adapter("bad", BasisLoraConfig(basis="B", targets=["lm_head"]))
    assert _same(before, _snapshot(other))


# ---------------------------------------------------------------------- refusals
def test_activating_the_basis_alone_is_refused():
    pm = with_loras("llama", plain=False)
    compress_to_shared_basis(pm, ["l0", "l1"], "B", rank=4)
    inputs = full_inputs("llama", 2)
    for setup in ("B", Stack("l0", "B")):
        with pytest.raises(pa.ConfigError, match="basis_lora adapters and cannot run by itself"):
            pm.set_active(setup)
    pm.set_active(None)
    with pytest.raises(pa.ConfigError, match="cannot run by itself"):
        pm(**inputs, adapter_names=["l0-jd", "B"])
    with pytest.raises(pa.StateError, match="cannot be merged"):
        pm.merge_adapter("B")
    with pytest.raises(pa.StateError, match=r"'B' is used by \['l0-jd', 'l1-jd'\]"):
        pm.remove_adapter("B")


def test_compress_refuses_bad_sources_and_leaves_the_model_unchanged():
    pm = with_loras("llama", plain=False)
    pm.add_adapter("ia", pa.IA3Config(), activate=False)
    pm.add_adapter("few", pa.LoraConfig(r=2, targets=["q_proj"]), activate=False)
    before = _snapshot(pm)
    with pytest.raises(pa.ConfigError, match="'ia' is a ia3 adapter"):
        compress_to_shared_basis(pm, ["l0", "ia"], "B", rank=4)
    with pytest.raises(pa.ConfigError, match="same sites"):
        compress_to_shared_basis(pm, ["l0", "few"], "B", rank=4)
    with pytest.raises(pa.AdapterNameError, match="'l1' already exists"):
        compress_to_shared_basis(pm, ["l0", "l1"], "l1", rank=4)
    with pytest.raises(pa.ConfigError, match="rank"):
        compress_to_shared_basis(pm, ["l0", "l1"], "B", rank=0)
    assert _same(before, _snapshot(pm))


def test_merge_and_removing_the_basis():
    pm = with_loras("llama", plain=False)
    compress_to_shared_basis(pm, ["l0", "l1"], "B", rank=3, activate=True)
    assert pm.active_adapters == ("l0-jd",)
    inputs = full_inputs("llama", 2)
    want = outputs(pm, "llama", "l0-jd", inputs)
    pm.merge_adapter("l0-jd")
    pm.set_active(None)
    with torch.no_grad():
        assert torch.allclose(_logits(pm(**inputs)), want, atol=1e-5)
    pm.unmerge_adapter("l0-jd")
    with pytest.raises(pa.StateError, match="'B' is used by"):
        pm.remove_adapter("B")
    pm.remove_adapter("l0-jd")
    pm.remove_adapter("l1-jd")
    pm.remove_adapter("B")
    assert not any(isinstance(p, BasisPart) for p in pm.modules())
