"""Combining adapters (polyadapter.ops.combine): parity with PEFT's add_weighted_adapter
for every combination type, the algebra of each method, files and provenance, and
refusals that leave the model unchanged."""
from __future__ import annotations

import pytest
import torch

from conftest import make_inputs, make_model, output_of
from polyadapter import AdapterModel, AdapterNameError, BottleneckConfig, ConfigError, IA3Config, LoraConfig
from polyadapter.ops.combine import combine
from polyadapter.ops.factors import delta_weights, lora_factors

import peft  # noqa: E402  the peer we check parity against (a test dependency)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
TOL = 1e-5        # per-site delta weights (|delta| ~ 1-5)
LOGITS_TOL = 1e-4

# Three LoRAs on the tiny llama: two site sets (q,v,embed / q,k,embed: the union is taken),
# two ranks (4 and 2), three scalings.
LORAS = {"a": LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"]),
         "b": LoraConfig(r=4, alpha=4, targets=["q_proj", "k_proj", "embed_tokens"]),
         "c": LoraConfig(r=2, alpha=6, targets=["q_proj", "v_proj", "embed_tokens"])}
W = [0.7, -0.4, 1.3]


def randomize(pm, name, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.adapter_parameters(name).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def build(kind, configs):
    pm = AdapterModel(make_model(kind))
    for i, (n, c) in enumerate(configs.items()):
        pm.add_adapter(n, c, activate=False)
        randomize(pm, n, seed=i)
    return pm


def logits(model, kind):
    with torch.no_grad():
        return output_of(model, make_inputs(kind))


def peft_twin(pm, kind, names, folder):
    """A PeftModel on the same base holding the same adapters (through our PEFT export).
    Its ``inject_adapter`` reseeds torch's RNG afterwards when ``twin.seed`` is set, so
    DARE's draws start from the same state as ours (injection itself draws numbers)."""
    for n in names:
        pm.save_adapter(n, folder / n, format="peft")
    twin = peft.PeftModel.from_pretrained(make_model(kind), str(folder / names[0]), adapter_name=names[0]).eval()
    for n in names[1:]:
        twin.load_adapter(str(folder / n), adapter_name=n)
    inner, inject = twin.base_model, twin.base_model.inject_adapter
    twin.seed = None

    def reseeding_inject(*args, **kwargs):
        out = inject(*args, **kwargs)
        if twin.seed is not None:
            torch.manual_seed(twin.seed)
        return out
    inner.inject_adapter = reseeding_inject
    return twin


def peft_deltas(twin, name):
    """Site -> PEFT's update for adapter ``name`` in the (out, in) layout."""
    out = {}
    for module_name, m in twin.base_model.model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer) and (name in m.lora_A or name in m.lora_embedding_A):
            d = m.get_delta_weight(name)
            out[module_name] = d.T if (m.fan_in_fan_out or name in m.lora_embedding_A) else d
        elif isinstance(m, peft.tuners.ia3.IA3Layer) and name in m.ia3_l:
            out[module_name] = m.ia3_l[name].detach()
    return out


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    pm = build("llama", LORAS)
    return pm, peft_twin(pm, "llama", list(LORAS), tmp_path_factory.mktemp("peft"))


# ---------------------------------------------------------------- parity with PEFT
PARITY = {  # id: (method, adapters, options)
    "linear": ("linear", "ab", {}),
    "cat-ranks-4-4-2": ("cat", "abc", {}),
    "svd-ranks-4-4-2": ("svd", "abc", {}),
    "svd-rank3": ("svd", "ac", dict(rank=3)),
    "ties-total": ("ties", "ab", dict(density=0.5)),
    "ties-frequency": ("ties", "ab", dict(density=0.5, majority_sign="frequency")),
    "magnitude_prune": ("magnitude_prune", "ab", dict(density=0.4)),
    "dare_linear": ("dare_linear", "ab", dict(density=0.5, seed=7)),
    "dare_ties": ("dare_ties", "ab", dict(density=0.6, seed=3)),
    "dare_ties-frequency": ("dare_ties", "ab", dict(density=0.3, seed=4, majority_sign="frequency")),
    "ties_svd": ("ties_svd", "abc", dict(density=0.5)),
    "dare_linear_svd": ("dare_linear_svd", "ac", dict(density=0.5, seed=1)),
    "dare_ties_svd": ("dare_ties_svd", "abc", dict(density=0.5, seed=2, majority_sign="frequency")),
    "magnitude_prune_svd": ("magnitude_prune_svd", "ab", dict(density=0.3, rank=5)),
}


def both(pm, twin, kind, name, method, names, weights, opts):
    """Combine in polyadapter and in PEFT; return (max |delta diff|, max |logit diff|, ours)."""
    record = combine(pm, name, names, weights, method, **opts)
    twin.seed = opts.get("seed")
    if isinstance(twin.base_model, peft.tuners.ia3.IA3Model):  # (IA)^3: a weighted sum, no options
        twin.add_weighted_adapter(names, weights, name)
    else:
        twin.add_weighted_adapter(names, weights, name, combination_type=method, svd_rank=opts.get("rank"),
                                  density=opts.get("density"),
                                  majority_sign_method=opts.get("majority_sign", "total"))
    twin.seed = None
    ours = delta_weights(pm, name) if record.config.method == "lora" else {
        s: p.ia3_l.detach() for s, p in pm.parts(name).items()}
    theirs = peft_deltas(twin, name)
    assert set(ours) == set(theirs)
    diff = max((ours[s] - theirs[s]).abs().max().item() for s in ours)
    pm.set_active(name)
    twin.set_adapter(name)
    out = (logits(pm, kind) - logits(twin, kind)).abs().max().item()
    pm.set_active()
    return diff, out, ours


@pytest.mark.parametrize("case", list(PARITY))
def test_lora_parity_with_peft(llama_pair, case):
    pm, twin = llama_pair
    method, names, opts = PARITY[case]
    names = list(names)
    diff, out, ours = both(pm, twin, "llama", f"p-{case}", method, names, W[:len(names)], opts)
    assert max(d.abs().max().item() for d in ours.values()) > 0.1  # non-trivial updates
    assert diff <= TOL and out <= LOGITS_TOL, (diff, out)


GPT2 = {"a": LoraConfig(r=4, alpha=8, targets=["c_attn", "mlp.c_fc"]),
        "b": LoraConfig(r=2, alpha=2, targets=["c_attn"])}


@pytest.mark.parametrize("method,opts", [("cat", {}), ("svd", dict(rank=3)),
                                         ("dare_ties_svd", dict(density=0.5, seed=5)),
                                         ("magnitude_prune_svd", dict(density=0.5))])
def test_lora_parity_with_peft_conv1d(tmp_path, method, opts):
    """GPT-2's Conv1D sites: PEFT prunes the update in the weight's (in, out) layout."""
    pm = build("gpt2", GPT2)
    twin = peft_twin(pm, "gpt2", ["a", "b"], tmp_path)
    diff, out, _ = both(pm, twin, "gpt2", "m", method, ["a", "b"], [0.8, 0.5], opts)
    assert diff <= TOL and out <= LOGITS_TOL, (diff, out)


def test_ia3_linear_parity_with_peft(tmp_path):
    configs = {"a": IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
               "b": IA3Config(targets=["k_proj", "down_proj", "up_proj"], feedforward=["down_proj", "up_proj"])}
    pm = AdapterModel(make_model("llama"))
    for i, (n, c) in enumerate(configs.items()):
        pm.add_adapter(n, c, activate=False)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in pm.adapter_parameters(n).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    twin = peft_twin(pm, "llama", ["a", "b"], tmp_path)
    diff, out, ours = both(pm, twin, "llama", "m", "linear", ["a", "b"], [0.6, 0.5], {})
    assert diff <= TOL and out <= LOGITS_TOL, (diff, out)
    record = pm.record("m")
    assert record.config.method == "ia3" and len(record.sites) == 8
    assert sorted(record.config.feedforward) == sorted(s for s in record.sites if "mlp" in s)
    # a site only one source has gets that source's weighted vector (the other counts as zero)
    up = "model.layers.0.mlp.up_proj"
    assert torch.equal(ours[up], pm.parts("b")[up].ia3_l.detach() * 0.5)


# ---------------------------------------------------------------- algebra
def test_cat_with_weights_1_0_is_the_first_adapter():
    pm = build("llama", LORAS)
    pm.set_active("a")
    ref = logits(pm, "llama")
    record = combine(pm, "m", ["a", "b", "c"], [1.0, 0.0, 0.0], "cat", activate=True)
    assert pm.active_adapters == ("m",)
    assert (logits(pm, "llama") - ref).abs().max() <= 1e-5
    q = "model.layers.0.self_attn.q_proj"
    assert pm.parts("m")[q].lora_A.shape[0] == 10 and record.config.rank_for(q) == 10  # ranks add


def _weight_layout(pm, site, delta):
    part = pm.parts(next(n for n in pm.adapters if site in pm.record(n).sites))[site]
    return delta.T if (part.is_conv1d or part.is_embedding) else delta


def test_task_arithmetic_is_base_plus_weighted_sum():
    pm = build("llama", LORAS)
    names, weights = ["a", "b", "c"], W
    deltas = {n: delta_weights(pm, n) for n in names}
    record = combine(pm, "ta", names, weights, "task_arithmetic")
    sites = record.sites
    assert set(sites) == set().union(*deltas.values())  # the union of the sites
    expected = {s: sum(w * deltas[n][s] for n, w in zip(names, weights) if s in deltas[n]) for s in sites}
    got = delta_weights(pm, "ta")
    assert max((got[s] - expected[s]).abs().max().item() for s in sites) <= 1e-5
    # exact refactorisation: rank = sum of the ranks present at the site
    assert pm.parts("ta")["model.layers.0.self_attn.q_proj"].lora_A.shape[0] == 10
    assert pm.parts("ta")["model.layers.0.self_attn.k_proj"].lora_A.shape[0] == 4
    # merged: the base weights become base + sum_i w_i delta_i
    modules = dict(pm.model.named_modules())
    before = {s: modules[s].base.weight.detach().clone() for s in sites}
    pm.merge_adapter("ta")
    for s in sites:
        want = before[s] + _weight_layout(pm, s, expected[s])
        assert (modules[s].base.weight - want).abs().max() <= 1e-5
    pm.unmerge_adapter("ta")
    # and the outputs: the combined adapter equals the (unmerged) sources' stack with weights
    # folded in — checked through cat, which is that sum exactly
    combine(pm, "cat", names, weights, "cat")
    pm.set_active("cat")
    ref = logits(pm, "llama")
    pm.set_active("ta")
    assert (logits(pm, "llama") - ref).abs().max() <= 1e-4


def test_svd_to_full_rank_is_task_arithmetic_and_rank_k_agrees():
    pm = build("llama", LORAS)
    combine(pm, "ta", ["a", "b", "c"], W, "task_arithmetic")
    combine(pm, "full", ["a", "b", "c"], W, "svd", rank=1000)  # capped at min(out, in) per site
    ta, full = delta_weights(pm, "ta"), delta_weights(pm, "full")
    assert max((ta[s] - full[s]).abs().max().item() for s in ta) <= 1e-5
    assert pm.parts("full")["model.layers.0.self_attn.k_proj"].lora_A.shape[0] == 16  # k_proj is 16 x 32
    assert pm.parts("full")["model.embed_tokens"].lora_A.shape[0] == 32
    combine(pm, "s3", ["a", "b", "c"], W, "svd", rank=3)
    combine(pm, "t3", ["a", "b", "c"], W, "task_arithmetic", rank=3)
    s3, t3 = delta_weights(pm, "s3"), delta_weights(pm, "t3")
    assert max((s3[s] - t3[s]).abs().max().item() for s in s3) <= 1e-5
    for s, d in s3.items():  # the best rank-3 approximation (Eckart-Young)
        sv = torch.linalg.svdvals(ta[s].double())
        assert torch.linalg.matrix_rank(d.double(), atol=1e-4) == 3
        err = torch.linalg.norm((ta[s] - d).double())
        assert abs(err - sv[3:].square().sum().sqrt()) <= 1e-4


def test_svd_default_rank_is_the_largest_source_rank():
    pm = build("llama", LORAS)
    record = combine(pm, "m", ["a", "c"], [1.0, 1.0], "svd")
    assert record.config.r == 4 and not record.config.rank_pattern
    assert record.provenance["rank"] == 4


def _top_mask(t, density):
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[t.abs().reshape(-1).topk(k).indices] = True
    return mask.view(t.shape)


def test_ties_and_magnitude_prune_sparsity():
    pm = build("llama", LORAS)
    fa, fb = lora_factors(pm, "a"), lora_factors(pm, "b")
    combine(pm, "mp", ["a"], [0.5], "magnitude_prune", density=0.25)
    for s, f in lora_factors(pm, "mp").items():  # one source: exactly the top 25% kept
        for got, src in ((f.A, fa[s].A), (f.B, fa[s].B)):
            assert int((got != 0).sum()) == int(0.25 * src.numel())
            assert torch.equal(got != 0, _top_mask(src, 0.25))
    combine(pm, "ties", ["a", "b"], [1.0, 1.0], "ties", density=0.3)
    for s, f in lora_factors(pm, "ties").items():  # nonzero exactly where some source kept an entry
        for which in ("A", "B"):
            kept = [_top_mask(getattr(src[s], which), 0.3) for src in (fa, fb) if s in src]
            union = torch.stack(kept).any(0)
            got = getattr(f, which)
            assert torch.equal(got != 0, union)
            assert (got != 0).float().mean() <= min(1.0, 0.3 * len(kept)) + 1e-6
    # the svd variant prunes the update itself: at full rank the result has that sparsity
    combine(pm, "mps", ["a"], [1.0], "magnitude_prune_svd", density=0.2, rank=1000)
    for s, d in delta_weights(pm, "mps").items():
        src = delta_weights(pm, "a")[s]
        assert torch.equal(d.abs() > 1e-4, _top_mask(src, 0.2))


def test_dare_keeps_about_density_rescaled_and_is_reproducible():
    pm = build("llama", LORAS)
    fa = lora_factors(pm, "a")
    combine(pm, "d1", ["a"], [1.0], "dare_linear", density=0.4, seed=11)
    combine(pm, "d2", ["a"], [1.0], "dare_linear", density=0.4, seed=11)
    combine(pm, "d3", ["a"], [1.0], "dare_linear", density=0.4, seed=12)
    f1, f2, f3 = lora_factors(pm, "d1"), lora_factors(pm, "d2"), lora_factors(pm, "d3")
    kept = total = 0
    for s, f in f1.items():
        root = fa[s].scaling ** 0.5  # weight 1: A and B each carry sqrt(scaling)
        for got, src in ((f.A, fa[s].A), (f.B, fa[s].B)):
            mask = got != 0
            kept, total = kept + int(mask.sum()), total + mask.numel()
            assert torch.allclose(got[mask], src[mask] * root / 0.4, rtol=1e-5, atol=1e-6)
        assert torch.equal(f.A, f2[s].A) and torch.equal(f.B, f2[s].B)  # same seed, same draws
    assert abs(kept / total - 0.4) < 0.05
    assert any(not torch.equal(f1[s].A, f3[s].A) for s in f1)  # another seed, other draws
    # without a seed, torch's global RNG is used (as PEFT does)
    torch.manual_seed(5)
    combine(pm, "g1", ["a", "b"], [1.0, 1.0], "dare_ties_svd", density=0.5)
    torch.manual_seed(5)
    combine(pm, "g2", ["a", "b"], [1.0, 1.0], "dare_ties_svd", density=0.5)
    g1, g2 = delta_weights(pm, "g1"), delta_weights(pm, "g2")
    assert all(torch.equal(g1[s], g2[s]) for s in g1)
    assert pm.record("g1").provenance["seed"] is None


def test_density_one_prunes_nothing():
    pm = build("llama", LORAS)
    combine(pm, "lin", ["a", "b"], [0.5, 0.5], "linear")
    combine(pm, "dare", ["a", "b"], [0.5, 0.5], "dare_linear", density=1.0, seed=0)
    combine(pm, "mp", ["a", "b"], [0.5, 0.5], "magnitude_prune", density=1)
    lin = delta_weights(pm, "lin")
    for n in ("dare", "mp"):
        d = delta_weights(pm, n)
        assert all(torch.equal(d[s], lin[s]) for s in lin)


# ---------------------------------------------------------------- heads, files, provenance
def test_modules_from_copies_the_head_and_files_round_trip(tmp_path):
    configs = {"a": LoraConfig(r=4, modules_to_save=["classifier"]), "b": LoraConfig(r=2)}
    pm = build("bert", configs)
    pm.set_active("a")
    ref = logits(pm, "bert")
    record = combine(pm, "m", ["a", "b"], [1.0, 0.0], "cat", modules_from="a", activate=True)
    assert record.saved_modules == ["classifier"]
    assert (logits(pm, "bert") - ref).abs().max() <= 1e-5  # head included
    assert record.provenance == {"operation": "combine", "method": "cat", "adapters": ["a", "b"],
                                 "weights": [1.0, 0.0], "modules_from": "a"}
    # native: saves and loads with its provenance
    pm.save_adapter("m", tmp_path / "native")
    fresh = AdapterModel(make_model("bert"))
    loaded = fresh.load_adapter(tmp_path / "native", name="m2")
    assert loaded.provenance == record.provenance
    assert fresh.record("m2").provenance == record.provenance
    assert (logits(fresh, "bert") - ref).abs().max() <= 1e-5
    # PEFT: the export loads in peft with the same function
    pm.save_adapter("m", tmp_path / "peft", format="peft")
    twin = peft.PeftModel.from_pretrained(make_model("bert"), str(tmp_path / "peft")).eval()
    assert (logits(twin, "bert") - ref).abs().max() <= 1e-5


def test_per_site_ranks_and_dare_provenance_round_trip(tmp_path):
    pm = build("llama", LORAS)
    record = combine(pm, "m", ["a", "b", "c"], W, "dare_ties_svd", density=0.5, seed=3, rank=6,
                     majority_sign="frequency", activate=True)
    assert record.provenance == {"operation": "combine", "method": "dare_ties_svd", "adapters": ["a", "b", "c"],
                                 "weights": W, "density": 0.5, "rank": 6, "majority_sign": "frequency", "seed": 3}
    ours = logits(pm, "llama")
    pm.save_adapter("m", tmp_path / "native")
    fresh = AdapterModel(make_model("llama"))
    fresh.load_adapter(tmp_path / "native")
    assert fresh.record("m").provenance == record.provenance
    assert (logits(fresh, "llama") - ours).abs().max() <= 1e-5
    # cat has per-site ranks (10 where all three act, 4 at k_proj): the export keeps them
    cat = combine(pm, "cat", ["a", "b", "c"], W, "cat", activate=True)
    assert cat.config.rank_pattern
    ours = logits(pm, "llama")
    pm.save_adapter("cat", tmp_path / "peft", format="peft")
    twin = peft.PeftModel.from_pretrained(make_model("llama"), str(tmp_path / "peft")).eval()
    assert (logits(twin, "llama") - ours).abs().max() <= 1e-5


# ---------------------------------------------------------------- refusals
def _snapshot(pm):
    return list(pm.adapters), pm.active_adapters, {k: v.clone() for k, v in pm.model.state_dict().items()}


REFUSALS = {  # id: (kwargs for combine, error, text the message names)
    "no-adapters": (dict(adapters=[], weights=[]), ConfigError, "at least one adapter"),
    "weights-count": (dict(adapters=["a", "b"], weights=[1.0]), ConfigError, "2 adapters"),
    "unknown-adapter": (dict(adapters=["a", "zz"], weights=[1, 1]), ConfigError, "'zz'"),
    "bad-weight": (dict(adapters=["a", "b"], weights=[1, float("nan")]), ConfigError, "'b'"),
    "linear-different-ranks": (dict(adapters=["a", "c"], weights=[1, 1]), ConfigError,
                               "'a' has rank 4, 'c' has rank 2"),
    "ties-different-ranks": (dict(adapters=["b", "c"], weights=[1, 1], method="ties", density=0.5), ConfigError,
                             "at site 'model.embed_tokens' 'b' has rank 4"),
    "unknown-method": (dict(method="average"), ConfigError, "unknown method 'average'"),
    "density-missing": (dict(method="ties"), ConfigError, "density=None"),
    "density-zero": (dict(method="dare_linear", density=0.0), ConfigError, "density=0.0"),
    "density-above-one": (dict(method="magnitude_prune_svd", density=1.5), ConfigError, "density=1.5"),
    "density-unused": (dict(method="cat", density=0.5), ConfigError, "density is not used"),
    "rank-zero": (dict(method="svd", rank=0), ConfigError, "rank=0"),
    "rank-unused": (dict(method="linear", rank=4), ConfigError, "rank is not used"),
    "seed-unused": (dict(method="ties", density=0.5, seed=1), ConfigError, "seed is not used"),
    "bad-majority-sign": (dict(method="ties", density=0.5, majority_sign="mean"), ConfigError, "'mean'"),
    "mixed-methods": (dict(adapters=["a", "i"], weights=[1, 1]), ConfigError, "'i' (ia3)"),
    "not-lora": (dict(adapters=["n"], weights=[1]), ConfigError, "'n' is a bottleneck adapter"),
    "ia3-cat": (dict(adapters=["i", "i2"], weights=[1, 1], method="cat"), ConfigError, "only by method 'linear'"),
    "ia3-ff-mismatch": (dict(adapters=["i", "i2"], weights=[1, 1]), ConfigError, "model.layers.0.mlp.down_proj"),
    "modules_from-unknown": (dict(modules_from="zz"), ConfigError, "'zz'"),
    "name-taken": (dict(name="b"), AdapterNameError, "'b' already exists"),
    "name-invalid": (dict(name="a.b"), AdapterNameError, "invalid"),
}


@pytest.fixture(scope="module")
def refusal_model():
    pm = build("llama", LORAS)
    pm.add_adapter("i", IA3Config(targets=["k_proj", "down_proj"], feedforward=["down_proj"]), activate=False)
    pm.add_adapter("i2", IA3Config(targets=["k_proj", "down_proj"], feedforward=[]), activate=False)
    pm.add_adapter("n", BottleneckConfig(), activate=False)
    pm.set_active("a")
    return pm


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_problem_and_change_nothing(refusal_model, case):
    pm = refusal_model
    kwargs, error, text = REFUSALS[case]
    call = dict(name="new", adapters=["a", "b"], weights=[1.0, 1.0], method="linear") | kwargs
    before = _snapshot(pm)
    with pytest.raises(error) as info:
        combine(pm, **call)
    assert text in str(info.value), str(info.value)
    adapters, active, state = _snapshot(pm)
    assert adapters == before[0] and active == before[1]
    assert state.keys() == before[2].keys() and all(torch.equal(state[k], v) for k, v in before[2].items())
