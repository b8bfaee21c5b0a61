"""Combining several adapters into one new adapter, PEFT's ``add_weighted_adapter`` and more.

    combine(pm, "both", ["topic", "style"], [0.7, 0.3], method="cat")
    combine(pm, "ties", ["a", "b", "c"], [1, 1, 1], method="ties", density=0.3)

The result is an ordinary LoRA adapter (or (IA)^3 adapter, for (IA)^3 sources) installed
on the same model, with scaling 1 (``alpha = r``) and its provenance recorded, so it
saves, loads, exports to PEFT and runs in mixed batches like any other adapter. The
sources are left untouched; an error leaves the model as it was.

Notation: source ``i`` has weight ``w_i``, factors ``A_i`` (r_i, in), ``B_i`` (out, r_i),
scaling ``s_i`` and update ``D_i = s_i B_i A_i``. Methods (all per site):

- ``linear``: ``A = sum_i sgn(w_i s_i) sqrt|w_i s_i| A_i``, ``B = sum_i sqrt|w_i s_i| B_i``
  (PEFT's "linear": a cheap approximation, not the weighted sum of the updates; every
  source must have the same rank at the site).
- ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``: exactly
  ``sum_i w_i D_i``, rank ``sum_i r_i`` (ranks may differ).
- ``task_arithmetic``: ``sum_i w_i D_i`` refactorised exactly by an SVD of its
  low-rank form (rank ``min(sum_i r_i, out, in)``), or its best rank-``rank`` part.
- ``svd``: the best rank-``rank`` approximation of ``sum_i w_i D_i`` (``rank`` defaults
  to the largest source rank), ``B = U S``, ``A = V^T``, as PEFT's "svd".
- ``magnitude_prune``: each of ``A_i`` and ``B_i`` keeps its ``int(density * numel)``
  largest-magnitude entries, then the ``linear`` weighted sums.
- ``ties``: as ``magnitude_prune``, then for every entry a sign is elected over the
  (unweighted) pruned tensors (``majority_sign``: "total" = sign of their sum,
  "frequency" = the more frequent sign, ties go to +), and the weighted entries of that
  sign are averaged (summed, divided by how many sources have that sign there).
- ``dare_linear``: each of ``A_i`` and ``B_i`` keeps every entry with probability
  ``density`` (Bernoulli), rescaled by ``1/density``, then the ``linear`` weighted sums.
- ``dare_ties``: DARE's random drop and rescale, then TIES's sign election and mean.
- ``*_svd`` (``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``,
  ``magnitude_prune_svd``): the same rule applied to the full updates ``D_i`` (weights
  ``w_i``, no square roots), then truncated to rank ``rank`` by SVD as ``svd``.

These follow PEFT's ``LoraModel.add_weighted_adapter`` exactly (same tensors, same
pruning, same order of random draws), with these differences:

- Sites: the result acts on the union of the sources' sites. A source absent at a site
  counts as zero there (it is left out of that site's sum; for TIES a zero never votes
  and is never counted, so this is the same as a zero tensor).
- Ranks are checked per site, not per adapter. ``rank`` (svd methods) is capped per site
  at ``min(out, in)`` (PEFT fails there); ``cat``'s rank at a site is the sum of the ranks
  of the sources present there (PEFT pads to the global sum with zeros).
- With one source PEFT silently switches to "linear"; here the requested method runs.
- Randomness (DARE): ``seed`` gives a private generator (seeded once, then drawn in
  PEFT's order: sites in module order; per site every source's A, then every source's
  B, or every source's update for ``*_svd``). Without ``seed`` the global torch RNG is
  used, as PEFT does. ``density=1`` keeps everything and draws nothing.
- Arithmetic is float32 (sources of other dtypes are upcast, the result cast back).

(IA)^3 sources: only ``linear``, the weighted sum of the vectors ``l = sum_i w_i l_i``
(PEFT's IA3 ``add_weighted_adapter``). As in PEFT a source absent at a site counts as
zero there, not as the identity (ones): weight sources at the same sites, or expect a
zero vector's share. A site must be feed-forward (input-scaling) in all sources having it
or in none.
"""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..methods.ia3 import IA3Config
from ..sites import original_modules
from .factors import install_lora, lora_factors, source_names

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # act on A and B
SVD_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = FACTOR_METHODS + ("cat", "task_arithmetic") + SVD_METHODS
DENSITY_METHODS = frozenset(m for m in METHODS if m.split("_svd")[0] in
                            ("ties", "dare_linear", "dare_ties", "magnitude_prune"))
SIGN_METHODS = frozenset({"ties", "dare_ties", "ties_svd", "dare_ties_svd"})
RANDOM_METHODS = frozenset({"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"})
RANK_METHODS = frozenset(SVD_METHODS + ("task_arithmetic",))
SIGN_RULES = ("total", "frequency")


def combine(pm, name: str, adapters, weights, method: str = "linear", *, rank: int | None = None,
            density: float | None = None, majority_sign: str = "total", seed: int | None = None,
            modules_from: str | None = None, activate: bool = False):
    """Install adapter ``name`` on ``pm``: the combination of ``adapters`` (LoRA, or all
    (IA)^3) with ``weights`` by ``method`` (see the module docstring for each method's
    exact definition). Returns the new adapter's record.

    ``rank``: the result's rank for ``task_arithmetic`` and the svd methods. ``density``:
    the fraction kept, in (0, 1], for ties / dare / magnitude_prune. ``majority_sign``:
    "total" or "frequency" for the TIES sign election. ``seed``: DARE's random drops.
    ``modules_from``: an adapter whose ``modules_to_save`` (e.g. a task head) the result
    copies. Options a method does not use are refused, so a typo cannot pass silently.
    Raises ConfigError (AdapterNameError for the new name) and leaves the model unchanged
    on any error."""
    where = f"combine {name!r}"
    adapters, weights = _check_sources(pm, name, adapters, weights, modules_from, where)
    kinds = {a: pm.record(a).config.method for a in adapters}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{a!r} ({k})" for a, k in kinds.items())
        raise ConfigError(f"{where}: cannot combine adapters of different methods: {listing}")
    kind = next(iter(kinds.values()))
    if kind == "ia3":
        return _combine_ia3(pm, name, adapters, weights, method, rank, density, majority_sign, seed,
                            modules_from, activate, where)
    if kind != "lora":
        raise ConfigError(f"{where}: adapter {adapters[0]!r} is a {kind} adapter; combine takes LoRA or (IA)^3 "
                          f"adapters")
    _check_options(method, rank, density, majority_sign, seed, where)
    where = f"combine {name!r} ({method})"

    sources = {a: lora_factors(pm, a) for a in dict.fromkeys(adapters)}
    sites = _site_order(pm, [set(f) for f in sources.values()])
    _check_saved_overlap(pm, modules_from, sites, where)
    transposed = _transposed_sites(pm, adapters, sites)
    present = {s: [(a, w, sources[a][s]) for a, w in zip(adapters, weights) if s in sources[a]] for s in sites}

    if method in FACTOR_METHODS:
        for s, items in present.items():
            ranks = {a: f.rank for a, _, f in items}
            if len(set(ranks.values())) > 1:
                listing = ", ".join(f"{a!r} has rank {r}" for a, r in ranks.items())
                raise ConfigError(f"{where}: needs the same rank in every adapter at each site; at site {s!r} "
                                  f"{listing}. Use 'cat', 'task_arithmetic' or 'svd' for different ranks")
    if method in SVD_METHODS and rank is None:
        rank = max(f.rank for items in present.values() for _, _, f in items)

    rng = _Random(seed)
    factors = {}
    for s, items in present.items():
        fs, ws = [f for _, _, f in items], [w for _, w, _ in items]
        out_f, in_f = fs[0].B.shape[0], fs[0].A.shape[1]
        if method == "cat":
            A = torch.cat([f.A * w * f.scaling for f, w in zip(fs, ws)], dim=0)
            B = torch.cat([f.B for f in fs], dim=1)
        elif method in FACTOR_METHODS:
            ws_ = [w * f.scaling for f, w in zip(fs, ws)]
            wa = [math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in ws_]  # the sign on A only
            wb = [math.sqrt(abs(v)) for v in ws_]
            A = _merge(method, [f.A for f in fs], wa, density, majority_sign, rng)
            B = _merge(method, [f.B for f in fs], wb, density, majority_sign, rng)
        elif method in ("task_arithmetic", "svd"):
            A_cat = torch.cat([f.A * w * f.scaling for f, w in zip(fs, ws)], dim=0)
            B_cat = torch.cat([f.B for f in fs], dim=1)
            k = min(out_f, in_f, A_cat.shape[0]) if rank is None else min(rank, out_f, in_f)
            A, B = _refactor(B_cat, A_cat, k)
        else:  # the pruning rules on the full updates, then a truncated SVD
            flip = s in transposed  # PEFT holds these updates in the weight's (in, out) layout
            deltas = [f.delta().T if flip else f.delta() for f in fs]
            delta = _merge(method[:-len("_svd")], deltas, ws, density, majority_sign, rng)
            A, B = _truncated_svd(delta.T if flip else delta, min(rank, out_f, in_f))
        factors[s] = (A, B)

    provenance = {"operation": "combine", "method": method, "adapters": list(adapters), "weights": list(weights)}
    if method in DENSITY_METHODS:
        provenance["density"] = float(density)
    if method in RANK_METHODS and rank is not None:
        provenance["rank"] = int(rank)
    if method in SIGN_METHODS:
        provenance["majority_sign"] = majority_sign
    if method in RANDOM_METHODS:
        provenance["seed"] = seed
    if modules_from is not None:
        provenance["modules_from"] = modules_from
    return install_lora(pm, name, factors, modules_from=modules_from, provenance=provenance, activate=activate)


# ---------------------------------------------------------------- checks
def _check_sources(pm, name, adapters, weights, modules_from, where) -> tuple[list[str], list[float]]:
    pm.check_new_name(name)
    adapters = source_names(pm, adapters, where)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise ConfigError(f"{where}: weights must be a list of numbers, one per adapter; found {weights!r}")
    weights = list(weights.tolist() if isinstance(weights, torch.Tensor) else weights)
    if len(weights) != len(adapters):
        raise ConfigError(f"{where}: {len(adapters)} adapters {adapters} but {len(weights)} weights {weights}")
    out = []
    for a, w in zip(adapters, weights):
        try:
            if isinstance(w, bool):
                raise TypeError
            v = float(w)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: the weight of adapter {a!r} is {w!r}; expected a number") from None
        if not math.isfinite(v):
            raise ConfigError(f"{where}: the weight of adapter {a!r} is {w!r}; expected a finite number")
        out.append(v)
    if modules_from is not None and modules_from not in pm.adapters:
        raise ConfigError(f"{where}: modules_from={modules_from!r} names no adapter; adapters: {pm.adapters}")
    return adapters, out


def _check_options(method, rank, density, majority_sign, seed, where) -> None:
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}; expected one of {list(METHODS)}")
    where = f"{where} ({method})"
    if rank is not None:
        if method not in RANK_METHODS:
            raise ConfigError(f"{where}: rank is not used by this method; it applies to "
                              f"{sorted(RANK_METHODS)}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ConfigError(f"{where}: rank={rank!r} is invalid; expected a positive integer")
    if method in DENSITY_METHODS:
        ok = isinstance(density, (int, float)) and not isinstance(density, bool) and 0 < density <= 1
        if not ok:
            raise ConfigError(f"{where}: density={density!r} is invalid; this method needs the fraction of "
                              f"entries to keep, a number in (0, 1]")
    elif density is not None:
        raise ConfigError(f"{where}: density is not used by this method; it applies to {sorted(DENSITY_METHODS)}")
    if majority_sign not in SIGN_RULES:
        raise ConfigError(f"{where}: majority_sign={majority_sign!r} is invalid; expected one of {list(SIGN_RULES)}")
    if majority_sign != "total" and method not in SIGN_METHODS:
        raise ConfigError(f"{where}: majority_sign is not used by this method; it applies to {sorted(SIGN_METHODS)}")
    if seed is not None:
        if method not in RANDOM_METHODS:
            raise ConfigError(f"{where}: seed is not used by this method (nothing random); it applies to "
                              f"{sorted(RANDOM_METHODS)}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"{where}: seed={seed!r} is invalid; expected a non-negative integer")


def _check_saved_overlap(pm, modules_from, sites, where) -> None:
    if modules_from is None:
        return
    clash = [s for s in pm.record(modules_from).saved_modules if s in set(sites)]
    if clash:
        raise ConfigError(f"{where}: module {clash[0]!r} is in the modules_to_save of {modules_from!r} and also "
                          f"a site of the combined adapters")


def _site_order(pm, site_sets: list[set]) -> list[str]:
    """The union of the sites, in the model's module order (PEFT's order of work)."""
    union = set().union(*site_sets)
    return [s for s in original_modules(pm.model) if s in union]


def _transposed_sites(pm, adapters, sites) -> set[str]:
    """Sites whose base weight is stored (in, out): Conv1D and Embedding."""
    out = set()
    for a in dict.fromkeys(adapters):
        for s, part in pm.parts(a).items():
            if s in sites and (getattr(part, "is_conv1d", False) or getattr(part, "is_embedding", False)):
                out.add(s)
    return out


# ---------------------------------------------------------------- merge rules
class _Random:
    """Bernoulli draws from a private generator per device (``seed``) or torch's global RNG."""

    def __init__(self, seed: int | None):
        self.seed, self.generators = seed, {}

    def bernoulli(self, p: torch.Tensor) -> torch.Tensor:
        if self.seed is None:
            return torch.bernoulli(p)
        g = self.generators.get(p.device)
        if g is None:
            g = self.generators[p.device] = torch.Generator(device=p.device).manual_seed(self.seed)
        return torch.bernoulli(p, generator=g)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """``t`` with all but its ``int(density * numel)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[t.abs().reshape(-1).topk(int(density * t.numel())).indices] = 1
    return t * keep.view(t.shape)


def _drop_random(t: torch.Tensor, density: float, rng: _Random) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescale the kept by 1/density."""
    if density >= 1:
        return t
    return t * rng.bernoulli(torch.full_like(t, density)) / density


def _merge(rule: str, tensors: list[torch.Tensor], weights: list[float], density, sign_rule, rng) -> torch.Tensor:
    """One site's tensors (one per source) merged by ``rule`` with ``weights``."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [_keep_largest(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [_drop_random(t, density, rng) for t in tensors]
    stacked = torch.stack(tensors)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * (stacked.dim() - 1))
    if rule not in ("ties", "dare_ties"):  # linear, svd, magnitude_prune, dare_linear: weighted sum
        return (stacked * w).sum(dim=0)
    signs = stacked.sign()
    score = stacked.sum(dim=0) if sign_rule == "total" else signs.sum(dim=0)
    agrees = signs == torch.where(score >= 0, 1.0, -1.0).to(signs.dtype)
    total = (stacked * w * agrees).sum(dim=0)
    return total / agrees.sum(dim=0).clamp(min=1)


# ---------------------------------------------------------------- refactorising
def _refactor(B: torch.Tensor, A: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') of rank ``k`` with ``B' A'`` the best rank-k approximation of ``B A``,
    without forming ``B A``: QR of both factors, SVD of the small core. Exact when ``k``
    reaches the rank of ``B A``; padded with zeros when ``k`` exceeds the inner size."""
    dtype = B.dtype
    qb, rb = torch.linalg.qr(B.double())
    qa, ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    j = min(k, S.numel())
    B_new = qb @ (U[:, :j] * S[:j])
    A_new = Vh[:j] @ qa.T
    if j < k:
        B_new = torch.cat([B_new, B_new.new_zeros(B_new.shape[0], k - j)], dim=1)
        A_new = torch.cat([A_new, A_new.new_zeros(k - j, A_new.shape[1])], dim=0)
    return A_new.to(dtype).contiguous(), B_new.to(dtype).contiguous()


def _truncated_svd(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``B = U_k S_k`` and ``A = V_k^T``: the best rank-k approximation."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:k].contiguous(), (U[:, :k] * S[:k]).contiguous()


# ---------------------------------------------------------------- (IA)^3
def _combine_ia3(pm, name, adapters, weights, method, rank, density, majority_sign, seed, modules_from,
                 activate, where):
    if method != "linear":
        raise ConfigError(f"{where}: (IA)^3 adapters combine only by method 'linear' (the weighted sum of their "
                          f"vectors); got {method!r}")
    unused = {"rank": rank, "density": density, "seed": seed}
    for key, value in unused.items():
        if value is not None:
            raise ConfigError(f"{where}: {key} is not used when combining (IA)^3 adapters")
    if majority_sign != "total":
        raise ConfigError(f"{where}: majority_sign is not used when combining (IA)^3 adapters")
    where = f"{where} (ia3 linear)"
    vectors, feedforward = {}, {}
    for a in dict.fromkeys(adapters):
        record = pm.record(a)
        parts = pm.parts(a)
        vectors[a] = {s: parts[s].ia3_l.detach().float() for s in record.sites}
        feedforward[a] = {s for s in record.sites if parts[s].is_feedforward}
    sites = _site_order(pm, [set(v) for v in vectors.values()])
    _check_saved_overlap(pm, modules_from, sites, where)
    ff_sites = []
    for s in sites:
        having = [a for a in vectors if s in vectors[a]]
        kinds = {a: s in feedforward[a] for a in having}
        if len(set(kinds.values())) > 1:
            ff = [a for a, v in kinds.items() if v]
            other = [a for a, v in kinds.items() if not v]
            raise ConfigError(f"{where}: site {s!r} is feed-forward (scales the input) in {ff} but scales the "
                              f"output in {other}; their vectors cannot be added")
        if any(kinds.values()):
            ff_sites.append(s)
    tensors = {}
    for s in sites:
        total = None
        for a, w in zip(adapters, weights):
            if s in vectors[a]:
                term = vectors[a][s] * w
                total = term if total is None else total + term
        tensors[f"{s}.ia3_l"] = total
    saved = list(pm.record(modules_from).saved_modules) if modules_from is not None else []
    config = IA3Config(targets=list(sites), feedforward=ff_sites, modules_to_save=saved)
    plan = pm.plan_adapter(name, config)
    if modules_from is not None:
        for s, copy in pm.parts(modules_from).items():
            if s in saved:
                tensors.update({f"{s}.{k}": v for k, v in copy.state_dict().items()})
    for k, v in plan.state_dict().items():
        if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape):
            raise ConfigError(f"{where}: cannot fill {k!r} of the new adapter")
    plan.load_tensors(tensors)
    plan.record.provenance = {"operation": "combine", "method": "linear", "adapters": list(adapters),
                              "weights": list(weights)}
    if modules_from is not None:
        plan.record.provenance["modules_from"] = modules_from
    pm.install(plan)
    if activate:
        pm.set_active(name)
    return pm.record(name)
