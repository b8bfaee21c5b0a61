"""Routing over LoRA libraries: Arrow (per-token, training-free, top-k by prototype
similarity) and Poly / MHR (learned weight-space mixtures of an inventory of skills,
with MHR-mu's plain average as an ordinary LoRA)."""
from __future__ import annotations

import pytest
import torch
from conftest import make_model
from test_mixed import assert_rows_match_alone, full_inputs
from torch import nn

import polyadapter as pa
from polyadapter import Average, Stack
from polyadapter.methods import arrow as arrow_mod
from polyadapter.methods.arrow import ArrowConfig
from polyadapter.methods.poly import PolyConfig, mhr_mu, train_poly
from polyadapter.sites import sites_of


def _randomize(pm, name, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_parameters(name).values():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _library(kind="llama", names="abc", r=4, targets=None, extra=()):
    pm = pa.AdapterModel(make_model(kind))
    for i, n in enumerate(list(names) + list(extra)):
        pm.add_adapter(n, pa.LoraConfig(r=r, targets=targets), activate=False)
        _randomize(pm, n, seed=10 + i)
    return pm


def _logits(pm, setup, inputs):
    pm.set_active(setup)
    with torch.no_grad():
        out = pm(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def _snapshot(pm):
    return pm.adapters, {s: list(site.adapters) for s, site in sites_of(pm.model).items()}, pm.state.setup


class OneLinear(nn.Module):
    """One Linear site, tokens of width 8: where per-token routing can be checked exactly."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 6)

    def forward(self, x):
        return self.proj(x)


def _one_linear(ranks=(2, 2, 2), seed=0):
    torch.manual_seed(seed)
    pm = pa.AdapterModel(OneLinear().eval())
    for i, r in enumerate(ranks):
        pm.add_adapter(f"l{i}", pa.LoraConfig(r=r, alpha=2.0 * r, targets=["proj"]), activate=False)
        _randomize(pm, f"l{i}", seed=20 + i, scale=0.5)
    return pm


def _dense(part):
    w = part.lora_B @ part.lora_A
    if part.pissa:
        w = w - part.lora_B0 @ part.lora_A0
    return (part.scaling * w).detach()


# ---------------------------------------------------------------------- Arrow
def test_prototypes_are_the_top_right_singular_vectors_up_to_sign():
    pm = _one_linear(ranks=(1, 3, 8))
    pm.add_adapter("pi", pa.LoraConfig(r=2, init="pissa", targets=["proj"]), activate=False)
    _randomize(pm, "pi", seed=3)   # PiSSA: delta = s (B A - B0 A0), a rank-4 update
    pm.add_adapter("ar", ArrowConfig(library=["l0", "l1", "l2", "pi"]), activate=False)
    part = pm.parts("ar")["proj"]
    names, protos, _ = part.routing_state()
    assert names == ["l0", "l1", "l2", "pi"]
    for name, v in zip(names, protos):
        want = torch.linalg.svd(_dense(pm.parts(name)["proj"])).Vh[0]
        assert torch.allclose(v.norm(), torch.tensor(1.0), atol=1e-5)
        assert abs(torch.dot(v, want).item()) == pytest.approx(1.0, abs=1e-4), name


def test_prototypes_are_recomputed_when_a_library_lora_changes():
    pm = _one_linear()
    pm.add_adapter("ar", ArrowConfig(library=["l0", "l1", "l2"]), activate=False)
    part = pm.parts("ar")["proj"]
    before = part.routing_state()[1].clone()
    _randomize(pm, "l1", seed=99, scale=2.0)   # in place, as an optimiser step or a reload would
    after = part.routing_state()[1]
    want = torch.linalg.svd(_dense(pm.parts("l1")["proj"])).Vh[0]
    assert abs(torch.dot(after[1], want).item()) == pytest.approx(1.0, abs=1e-4)
    assert not torch.allclose(before[1].abs(), after[1].abs(), atol=1e-3)
    assert torch.equal(before[0], after[0])


def test_top1_gives_each_token_the_lora_its_direction_selects():
    torch.manual_seed(0)
    pm = pa.AdapterModel(OneLinear().eval())
    eye = torch.eye(8)
    for i in range(3):   # LoRA i reads only input direction e_i: its prototype is +-e_i
        pm.add_adapter(f"l{i}", pa.LoraConfig(r=1, alpha=1.0, targets=["proj"]), activate=False)
        with torch.no_grad():
            part = pm.parts(f"l{i}")["proj"]
            part.lora_A.copy_(eye[i:i + 1] * (i + 1))
            part.lora_B.copy_(torch.randn(6, 1))
    pm.add_adapter("ar", ArrowConfig(library=["l0", "l1", "l2"], top_k=1), activate=False)
    choice = torch.tensor([[2, 0, 1, 1, 0], [0, 2, 2, 1, 0]])
    x = 3 * eye[choice] + 0.05 * torch.randn(2, 5, 8)       # every token mostly along its chosen direction
    x[..., 3:] += 0.3 * torch.randn(2, 5, 5)                 # and some weight on directions no LoRA reads
    got = _logits(pm, "ar", {"x": x})
    alone = torch.stack([_logits(pm, f"l{i}", {"x": x}) for i in range(3)])   # (lib, batch, tokens, out)
    want = alone.gather(0, choice[None, ..., None].expand(1, 2, 5, 6))[0]
    assert torch.allclose(got, want, atol=1e-5)
    idx, w = pm.parts("ar")["proj"].route(x)
    assert torch.equal(idx[:, 0], choice.flatten()) and torch.allclose(w, torch.ones_like(w))


def test_top_k_mixes_the_kept_loras_with_a_softmax_of_abs_similarity():
    pm = _one_linear(ranks=(2, 3, 2, 4))
    pm.add_adapter("ar", ArrowConfig(library=["l0", "l1", "l2", "l3"], top_k=2, temperature=0.3), activate=False)
    x = torch.randn(3, 4, 8)
    got = _logits(pm, "ar", {"x": x})
    parts = [pm.parts(f"l{i}")["proj"] for i in range(4)]
    protos = torch.stack([torch.linalg.svd(_dense(p)).Vh[0] for p in parts])
    logits = (x @ protos.T).abs() / 0.3
    top, idx = logits.topk(2, dim=-1)
    w = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, -1))
    deltas = torch.stack([x @ _dense(p).T for p in parts], dim=-2)           # (..., lib, out)
    want = pm.model.proj.base(x) + (w[..., None] * deltas).sum(-2)
    assert torch.allclose(got, want, atol=1e-5)


def test_arrow_runs_one_gathered_lora_call_per_kept_rank(monkeypatch):
    pm = _one_linear(ranks=(2, 2, 2, 2, 2))
    pm.add_adapter("ar", ArrowConfig(library=[f"l{i}" for i in range(5)], top_k=2), activate=True)
    calls = []
    real = arrow_mod.lora_delta
    monkeypatch.setattr(arrow_mod, "lora_delta", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        pm(x=torch.randn(4, 7, 8))
    assert len(calls) == 2


def test_arrow_with_every_lora_and_a_huge_temperature_is_the_uniform_average():
    pm = _library()
    pm.add_adapter("ar", ArrowConfig(library=["a", "b", "c"], top_k=3, temperature=1e9), activate=False)
    x = full_inputs("llama", 3)
    assert torch.allclose(_logits(pm, "ar", x), _logits(pm, Average("a", "b", "c"), x), atol=1e-5)


# ---------------------------------------------------------------------- Poly / MHR
def _set_logits(pm, name, fn):
    with torch.no_grad():
        for part in pm.parts(name).values():
            part.routing_logits.copy_(fn(part.routing_logits))


@pytest.mark.parametrize("mode, heads", [("mhr", 2), ("mhr_z", 4), ("poly", 1)])
def test_poly_with_logits_strongly_favouring_one_skill_is_that_skill(mode, heads):
    pm = _library()
    pm.add_adapter("po", PolyConfig(inventory=["a", "b", "c"], n_heads=heads, mode=mode), activate=False)
    _set_logits(pm, "po", lambda t: torch.tensor([-30.0, 30.0, -30.0]).expand_as(t))
    x = full_inputs("llama", 2)
    assert torch.allclose(_logits(pm, "po", x), _logits(pm, "b", x), atol=1e-4)


def test_uniform_poly_is_the_factor_average_which_mhr_mu_installs():
    pm = _library(kind="gpt2")   # Conv1D sites
    pm.add_adapter("p1", PolyConfig(inventory=["a", "b", "c"], init="zeros"), activate=False)
    pm.add_adapter("p4", PolyConfig(inventory=["a", "b", "c"], n_heads=4, mode="poly", init="zeros"),
                   activate=False)
    record = mhr_mu(pm, "mu", ["a", "b", "c"])
    assert record.config.method == "lora" and record.provenance["operation"] == "mhr_mu"
    assert record.provenance["inventory"] == ["a", "b", "c"] and record.sites == pm.record("p1").sites
    site = record.sites[0]
    parts = [pm.parts(n)[site] for n in "abc"]
    mu = pm.parts("mu")[site]
    assert torch.allclose(mu.scaling * mu.lora_A, sum(p.lora_A for p in parts) / 3, atol=1e-6)
    assert torch.allclose(mu.lora_B, sum(p.scaling * p.lora_B for p in parts) / 3, atol=1e-6)
    x = full_inputs("gpt2", 2)
    want = _logits(pm, "mu", x)
    assert torch.allclose(_logits(pm, "p1", x), want, atol=1e-5)
    assert torch.allclose(_logits(pm, "p4", x), want, atol=1e-5)   # uniform in every head is the same mixture


def test_mhr_z_trains_only_the_routing_logits_and_lowers_the_loss():
    from conftest import MLP_TARGETS, make_inputs
    pm = _library(kind="mlp", targets=MLP_TARGETS, r=4)
    pm.add_adapter("po", PolyConfig(inventory=["a", "b", "c"], n_heads=2, init="zeros"), activate=False)
    x = make_inputs("mlp", batch=8)
    target = _logits(pm, "b", x)          # the task: behave like skill "b"
    frozen = {k: v.clone() for k, v in pm.model.state_dict().items() if "routing_logits" not in k}
    params = pm.train_adapter("po")
    assert sorted(n for n, p in pm.named_parameters() if p.requires_grad) == sorted(
        f"{k}" for k, p in pm.named_parameters() if k.endswith("adapters.po.routing_logits"))
    assert len(params) == 2 and all(p.shape == (2, 3) for p in params)
    opt = torch.optim.Adam(params, lr=0.1)

    def loss_now():
        return ((pm(**x) - target) ** 2).mean()

    with torch.no_grad():
        before = loss_now().item()
    for _ in range(60):
        loss = loss_now()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    with torch.no_grad():
        after = loss_now().item()
    assert after < 0.1 * before
    assert all(torch.equal(v, pm.model.state_dict()[k]) for k, v in frozen.items())   # skills and base untouched
    for part in pm.parts("po").values():
        assert (part.weights()[:, 1] > 0.5).all()                                # routed towards "b"


def test_train_poly_in_mhr_mode_also_trains_the_skills():
    pm = _library(r=4)
    pm.add_adapter("po", PolyConfig(inventory=["a", "b"], mode="mhr"), activate=False)
    sites = pm.record("po").sites
    assert len(train_poly(pm, "po")) == len(sites) * (1 + 2 * 2)   # logits + A, B of both skills per site
    pm.add_adapter("pz", PolyConfig(inventory=["a", "b"]), activate=False)
    assert len(train_poly(pm, "pz")) == len(sites)
    params = train_poly(pm, "po")
    a_before = pm.parts("a")[sites[0]].lora_A.clone()
    x = full_inputs("llama", 2)
    pm(**x).logits.square().mean().backward()
    torch.optim.SGD(params, lr=1.0).step()
    assert not torch.equal(a_before, pm.parts("a")[sites[0]].lora_A)


def test_poly_merges_and_unmerges_exactly():
    pm = _library()
    pm.add_adapter("po", PolyConfig(inventory=["a", "b", "c"], n_heads=2, seed=0), activate=False)
    _set_logits(pm, "po", lambda t: torch.randn(t.shape))
    x = full_inputs("llama", 2)
    want = _logits(pm, "po", x)
    base = {k: v.clone() for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    pm.merge_adapter("po")
    assert torch.allclose(_logits(pm, None, x), want, atol=1e-5)
    pm.unmerge_adapter("po")
    assert all(torch.allclose(v, base[k], atol=1e-6) for k, v in pm.model.state_dict().items()
               if ".adapters." not in k)


# ---------------------------------------------------------------------- both: batches, composition, files
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_routing_rows_inside_a_mixed_batch_equal_each_row_alone(kind):
    pm = _library(kind=kind, extra=("lang",))
    pm.add_adapter("ar", ArrowConfig(library=["a", "b", "c"], top_k=2), activate=False)
    pm.add_adapter("po", PolyConfig(inventory=["a", "b", "c"], n_heads=2, mode="mhr"), activate=False)
    pm.add_adapter("pp", PolyConfig(inventory=["a", "b", "c"], mode="poly"), activate=False)
    for n in ("po", "pp"):
        _set_logits(pm, n, lambda t: torch.randn(t.shape))
    assert_rows_match_alone(pm, kind, ["ar", "po", "a", Stack("lang", "ar"), None, Stack("po", "lang"),
                                       Average("ar", "b"), "pp", "ar"])


def test_routing_adapters_compose_in_a_stack_with_the_arrow_mixture_on_top():
    pm = _library(extra=("lang",))
    pm.add_adapter("ar", ArrowConfig(library=["a", "b", "c"], top_k=3, temperature=1e9), activate=False)
    x = full_inputs("llama", 2)
    stacked = _logits(pm, Stack("lang", "ar"), x)
    assert torch.allclose(stacked, _logits(pm, Stack("lang", Average("a", "b", "c")), x), atol=1e-5)
    assert not torch.allclose(stacked, _logits(pm, "ar", x), atol=1e-3)


def test_save_and_load_round_trip(tmp_path):
    pm = _library()
    pm.add_adapter("ar", ArrowConfig(library=["a", "b", "c"], top_k=2, temperature=0.5), activate=False)
    pm.add_adapter("po", PolyConfig(inventory=["a", "b", "c"], n_heads=2, mode="poly"), activate=False)
    _set_logits(pm, "po", lambda t: torch.randn(t.shape))
    x = full_inputs("llama", 2)
    for name in ("ar", "po"):
        want = _logits(pm, name, x)
        config = pm.record(name).config
        pm.save_adapter(name, tmp_path / name)
        pm.remove_adapter(name)
        pm.load_adapter(tmp_path / name, activate=False)
        assert pm.record(name).config == config
        assert torch.equal(_logits(pm, name, x), want)
    # Without the library the files cannot load, and nothing changes.
    other = _library(names="ab")
    before = _snapshot(other)
    with pytest.raises(pa.AdapterNameError, match="library adapter 'c' is not in this model"):
        other.load_adapter(tmp_path / "ar")
    with pytest.raises(pa.AdapterNameError, match="inventory adapter 'c' is not in this model"):
        other.load_adapter(tmp_path / "po")
    assert _snapshot(other) == before


# ---------------------------------------------------------------------- refusals
def test_refusals_are_clear_and_leave_the_model_unchanged():
    pm = _library(names="ab")
    pm.add_adapter("ia", pa.IA3Config(), activate=False)
    pm.add_adapter("r8", pa.LoraConfig(r=8), activate=False)
    pm.add_adapter("q", pa.LoraConfig(r=4, targets=["q_proj"]), activate=False)
    pm.set_active("a")
    before = _snapshot(pm)
    cases = [
        (lambda: ArrowConfig(library=["a", "nope"]), pa.AdapterNameError, "library adapter 'nope' is not in"),
        (lambda: ArrowConfig(library=["a", "ia"]), pa.ConfigError, "'ia' is a ia3 adapter; arrow routes over LoRA"),
        (lambda: ArrowConfig(library=["a", "b"], targets=["lm_head"]), pa.ConfigError, "holds none of its adapters"),
        (lambda: PolyConfig(inventory=["a", "r8"]), pa.ConfigError, "ranks differ at site"),
        (lambda: PolyConfig(inventory=["a", "q"]), pa.ConfigError, "act at different sites"),
        (lambda: PolyConfig(inventory=["a", "b"], n_heads=5), pa.ConfigError, "n_heads=5 must divide"),
        (lambda: PolyConfig(inventory=["a", "nope"]), pa.AdapterNameError, "inventory adapter 'nope'"),
    ]
    for make, error, message in cases:
        with pytest.raises(error, match=message):
            pm.add_adapter("routed", make())
        assert _snapshot(pm) == before
    with pytest.raises(pa.ConfigError, match="ranks differ"):
        mhr_mu(pm, "mu", ["a", "r8"])
    assert _snapshot(pm) == before
    for bad, message in [({"library": ["a"]}, "at least two distinct"),
                         ({"library": ["a", "b"], "top_k": 3}, "top_k"),
                         ({"library": ["a", "b"], "temperature": 0}, "temperature")]:
        with pytest.raises(pa.ConfigError, match=message):
            ArrowConfig(**bad)
    for bad, message in [({"inventory": ["a", "a"]}, "distinct"), ({"inventory": ["a", "b"], "mode": "x"}, "mode"),
                         ({"inventory": ["a", "b"], "n_heads": 0}, "n_heads")]:
        with pytest.raises(pa.ConfigError, match=message):
            PolyConfig(**bad)


def test_a_routing_adapters_library_cannot_leave_and_merged_members_fail_clearly():
    pm = _library()
    pm.add_adapter("ar", ArrowConfig(library=["a", "b", "c"]), activate=False)
    pm.add_adapter("po", PolyConfig(inventory=["a", "b", "c"]), activate=False)
    with pytest.raises(pa.StateError, match="cannot be merged"):
        pm.merge_adapter("ar")
    with pytest.raises(pa.StateError, match=r"'c' is used by \['ar', 'po'\]"):
        pm.remove_adapter("c")
    assert "c" in pm.adapters
    x = full_inputs("llama", 2)
    pm.merge_adapter("a")
    with pytest.raises(pa.StateError, match="'a' is merged into the base"):
        _logits(pm, Stack("ar"), x)
