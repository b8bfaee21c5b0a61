"""Poly and Multi-Head Routing (Ponti et al., "Combining Modular Skills in Multitask
Learning", 2022; Caccia et al., "Multi-Head Adapter Routing for Cross-Task
Generalization", 2023): a task's adapter is a learned mixture of an *inventory* of
LoRA skills, mixed in weight space at every site.

A Poly adapter is an ordinary adapter whose config names the inventory, LoRA adapters
already in the model of one rank per site (``PolyConfig(inventory=["s0", "s1", "s2"],
n_heads=4)``). At every Linear-like site where the inventory acts it holds one
parameter, ``routing_logits`` of shape ``(n_heads, n_skills)``, and acts as the LoRA

    A  = concat over heads h of  sum_j w_hj A_j[:, block h of the input]
    B  = concat over heads h of  sum_j w_hj (s_j B_j)[block h of the output, :]
    out = y + B A x

where the heads split A's input and B's output dimension into ``n_heads`` equal blocks
(MHR; one head is Poly's plain mixture) and ``s_j`` is skill j's LoRA scaling, folded
into its B (for skills of equal scaling ``s`` this is ``s (sum w B)(sum w A)``).

Routing weights ``w`` per ``mode``:
- ``"mhr_z"`` (default) and ``"mhr"``: ``softmax(logits)`` over the skills, per head.
- ``"poly"``: Ponti et al.'s sigmoid-normalised weights, ``w = z / sum_j z_j``, with
  ``z = sigmoid(logits)`` in eval mode and, in train mode, ``z`` a relaxed-Bernoulli
  (Gumbel-sigmoid, temperature 1) sample — the paper's differentiable stand-in for its
  binary skill-allocation matrix. Training a ``"poly"`` adapter is therefore stochastic.

Which parameters train: ``"mhr_z"`` trains only the routing logits (MHR-z); the
inventory is detached in the forward pass, so it stays frozen even if someone turns
its gradients on. ``"mhr"`` and ``"poly"`` let gradients reach the inventory; since
the skills are other adapters, ``train_adapter("task")`` still trains only the logits,
and :func:`train_poly` also makes the inventory LoRAs' factors trainable (the skills
are shared: every Poly adapter over them sees the change).

For multitask learning make one Poly adapter per task over one inventory; a mixed
batch (``adapter_names=[...]``) then routes every row with its own task's logits.

:func:`mhr_mu` installs MHR-mu's starting point: the plain average of the inventory's
factors as an ordinary LoRA (equal to a one-head Poly adapter with uniform weights),
to be fine-tuned as usual.

The inventory must be present to run (adding or loading without it fails before
anything changes, and the model refuses to remove a skill while the Poly adapter
exists). The effective factors are cached until the logits or a skill change, and
recomputed every call while gradients flow. A Poly adapter merges like a LoRA (the
merged update is kept so unmerging removes exactly what was added). Inventory dropout
is not applied. PiSSA skills count as the rank-2r LoRA they equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError, StateError
from ..sites import LINEAR_TYPES, linear_dims, sites_of
from .arrow import (
    bind_sites,
    bound_site,
    cache_usable,
    check_members,
    lora_factors_of,
    member_part,
    part_tensors,
    tensors_key,
)
from .spec import MethodSpec

MODES = ("mhr_z", "mhr", "poly")
INITS = ("random", "zeros")
INIT_RANGE = 1e-3   # "random": logits ~ U(-1e-3, 1e-3), as in Ponti et al. (near-uniform weights)


@dataclass
class PolyConfig(AdapterConfig):
    """``inventory``: names of the LoRA skills mixed (at least two, distinct, same rank
    at every site). ``n_heads``: blocks of the input (A) and output (B) dimension, each
    routed on its own (must divide both at every site). ``mode``: ``mhr_z`` | ``mhr``
    | ``poly`` (see the module docstring). ``init``: ``random`` (logits uniform in
    ±1e-3, the papers' choice) or ``zeros`` (exactly uniform weights). ``seed``: fixes
    the ``random`` logits. ``targets`` is filled in with the Linear-like sites where
    the inventory acts (and saved)."""

    method: ClassVar[str] = "poly"
    inventory: list[str] | None = None
    n_heads: int = 1
    mode: str = "mhr_z"
    init: str = "random"
    seed: int | None = None

    def validate(self):
        if isinstance(self.inventory, tuple):
            self.inventory = list(self.inventory)
        self.require(isinstance(self.inventory, list) and len(self.inventory) >= 2
                     and all(isinstance(a, str) and a for a in self.inventory)
                     and len(set(self.inventory)) == len(self.inventory),
                     "inventory", "a list of at least two distinct LoRA adapter names")
        self.require(isinstance(self.n_heads, int) and not isinstance(self.n_heads, bool) and self.n_heads >= 1,
                     "n_heads", "a positive integer")
        self.require(self.mode in MODES, "mode", f"one of {list(MODES)}")
        self.require(self.init in INITS, "init", f"one of {list(INITS)}")
        self.require(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
                     "seed", "an integer or None")
        self.require(not self.modules_to_save, "modules_to_save", "empty (routing adapters save no module copies)")


def inventory_parts(site, names: list[str], what: str) -> list:
    """The inventory's LoRA parts at ``site`` (every one must act there, all of one rank)."""
    missing = [n for n in names if n not in site.adapters or site.site_name not in site.state.adapters[n].sites]
    if missing:
        raise ConfigError(f"{what}: inventory LoRA(s) {missing} do not act at site {site.site_name!r}; every "
                          f"skill must act at every site of the adapter")
    parts = [site.adapters[n] for n in names]
    ranks = {n: lora_factors_of(p)[0].shape[0] for n, p in zip(names, parts)}
    if len(set(ranks.values())) > 1:
        raise ConfigError(f"{what}: the inventory's ranks differ at site {site.site_name!r} ({ranks}); the "
                          f"skills are mixed factor by factor, so they need one rank")
    return parts


class PolyPart(nn.Module):
    def __init__(self, base: nn.Module, config: PolyConfig, site: str):
        super().__init__()
        what = f"poly adapter at site {site!r}"
        bound = bound_site(config, site, what)
        inventory_parts(bound, config.inventory, what)
        in_f, out_f = linear_dims(base)
        h = config.n_heads
        if in_f % h or out_f % h:
            raise ConfigError(f"{what}: n_heads={h} must divide the input ({in_f}) and output ({out_f}) width")
        object.__setattr__(self, "site", bound)   # not a submodule: the skills' weights stay theirs
        self.inventory = list(config.inventory)
        self.n_heads = h
        self.mode = config.mode
        self.is_conv1d = not isinstance(base, nn.Linear)
        logits = torch.zeros(h, len(self.inventory), device=base.weight.device, dtype=torch.float32)
        if config.init == "random":
            gen = torch.Generator().manual_seed(config.seed) if config.seed is not None else None
            logits.copy_(torch.rand(logits.shape, generator=gen) * (2 * INIT_RANGE) - INIT_RANGE)
        self.routing_logits = nn.Parameter(logits)
        object.__setattr__(self, "_cache", None)
        object.__setattr__(self, "_merged_delta", None)

    # -------------------------------------------------------- routing
    def weights(self) -> torch.Tensor:
        """Routing weights (n_heads, n_skills), each head's row summing to one."""
        logits = self.routing_logits.float()
        if self.mode != "poly":
            return torch.softmax(logits, dim=-1)
        if self.training:
            z = torch.distributions.RelaxedBernoulli(torch.tensor(1.0, device=logits.device), logits=logits).rsample()
        else:
            z = torch.sigmoid(logits)
        return z / (z.sum(-1, keepdim=True) + 1e-12)

    def skills(self) -> list:
        parts = []
        for n in self.inventory:
            part = member_part(self.site, self, n, "inventory")
            if part is None:
                owner = next((k for k, p in self.site.adapters.items() if p is self), "?")
                raise StateError(f"adapter {owner!r}: inventory LoRA {n!r} no longer acts at site "
                                 f"{self.site.site_name!r}")
            parts.append(part)
        return parts

    def effective_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, in), B (out, r)) of the LoRA this part acts as, scaling folded into B.
        Cached until the logits or a skill change; fresh (differentiable, and for
        ``poly`` in train mode freshly sampled) whenever needed."""
        parts = self.skills()
        tensors = [self.routing_logits] + [t for p in parts for t in part_tensors(p)]
        stochastic = self.mode == "poly" and self.training
        fresh = stochastic or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        key = (tensors_key(tensors), self.mode)
        if not fresh and self._cache is not None and self._cache[0] == key and cache_usable(self._cache[1]):
            return self._cache[1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and fresh):
            factors = self._mix(parts)
        if not fresh:
            object.__setattr__(self, "_cache", (key, factors))
        return factors

    def _mix(self, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
        As, Bs = [], []
        for p in parts:
            A, B = lora_factors_of(p)
            As.append(A)
            Bs.append(B * p.scaling)
        if len({A.shape for A in As}) > 1:
            owner = next((k for k, p in self.site.adapters.items() if p is self), "?")
            raise StateError(f"adapter {owner!r}: the inventory's shapes at site {self.site.site_name!r} differ "
                             f"now ({[tuple(A.shape) for A in As]}); the skills need one rank")
        A, B = torch.stack(As), torch.stack(Bs)                     # (S, r, in), (S, out, r)
        if self.mode == "mhr_z":
            A, B = A.detach(), B.detach()                           # MHR-z: only the routing trains
        w = self.weights().to(A.dtype)                              # (H, S)
        S, r, d_in = A.shape
        d_out, H = B.shape[1], self.n_heads
        A_eff = torch.einsum("hs,srhd->rhd", w, A.view(S, r, H, d_in // H)).reshape(r, d_in)
        B_eff = torch.einsum("hs,shor->hor", w, B.view(S, H, d_out // H, r)).reshape(d_out, r)
        return A_eff, B_eff

    def apply(self, inner, x):
        y = inner(x)
        A, B = self.effective_factors()
        first, rest = (y, None) if isinstance(y, torch.Tensor) else (y[0], tuple(y[1:]))
        new = first + F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)).to(first.dtype)
        return new if rest is None else (new,) + rest

    # -------------------------------------------------------- weight space
    def delta_weight(self) -> torch.Tensor:
        """The update ``B A`` in the base weight's own layout."""
        A, B = self.effective_factors()
        w = B @ A
        return w.T if self.is_conv1d else w

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        delta = self.delta_weight().to(base.weight.dtype)
        base.weight.add_(delta)
        object.__setattr__(self, "_merged_delta", delta)   # unmerge removes exactly this

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        delta = self._merged_delta if self._merged_delta is not None else self.delta_weight().to(base.weight.dtype)
        base.weight.sub_(delta)
        object.__setattr__(self, "_merged_delta", None)

    def extra_repr(self) -> str:
        return f"inventory={self.inventory}, n_heads={self.n_heads}, mode={self.mode!r}"


def _shared_sites(model: nn.Module, config, names: list[str]) -> list[str]:
    """Linear-like sites where every inventory LoRA acts; refuses an inventory whose
    LoRAs act at different sites (the mixture is defined site by site)."""
    sites = check_members(model, config, names, "inventory")
    partial = {s: [n for n in names if n not in members] for s, members in sites.items() if len(members) < len(names)}
    if partial:
        s, missing = next(iter(partial.items()))
        raise ConfigError(f"{config.method} config: the inventory LoRAs act at different sites (e.g. {missing} "
                          f"not at {s!r}); pass targets= the sites where all of them act")
    if not sites:
        raise ConfigError(f"{config.method} config: the inventory {names} acts at no Linear-like site of this model")
    return list(sites)


def _fill_defaults(model: nn.Module, config: PolyConfig) -> PolyConfig:
    if config.targets is None:
        config = config.replace(targets=_shared_sites(model, config, config.inventory))
    else:
        check_members(model, config, config.inventory, "inventory")
    return bind_sites(model, config)


# ---------------------------------------------------------------------- helpers
def train_poly(pm, name: str) -> list[nn.Parameter]:
    """``pm.train_adapter(name)`` (the routing logits) and, for ``mhr``/``poly`` modes,
    also the inventory LoRAs' factors at the adapter's sites. Returns every trainable
    parameter."""
    record = pm.record(name)
    if record.config.method != "poly":
        raise ConfigError(f"adapter {name!r} is a {record.config.method} adapter, not a poly adapter")
    params = pm.train_adapter(name)
    if record.config.mode == "mhr_z":
        return params
    seen = {id(p) for p in params}
    sites = sites_of(pm.model)
    for n in record.config.inventory:
        for s in record.sites:
            if n in sites[s].adapters:
                for p in (sites[s].adapters[n].lora_A, sites[s].adapters[n].lora_B):
                    if id(p) not in seen:
                        seen.add(id(p))
                        p.requires_grad_(True)
                        params.append(p)
    return params


def mhr_mu(pm, name: str, inventory: list[str], *, activate: bool = False, overwrite: bool = False):
    """Install MHR-mu's starting point: a LoRA ``name`` whose factors at each site are
    the plain averages of the inventory's (``mean A_j``, ``mean s_j B_j``; scaling 1),
    at the sites a Poly adapter over ``inventory`` would use. It equals a one-head Poly
    adapter with uniform weights, and is an ordinary LoRA to fine-tune. Returns the
    record; its provenance names the operation and the inventory."""
    from ..ops.factors import install_lora

    inventory = list(inventory)
    probe = PolyConfig(inventory=inventory)   # validates the list
    what = f"mhr_mu {name!r}"
    site_objs = sites_of(pm.model)
    factors = {}
    for s in _shared_sites(pm.model, probe, inventory):
        parts = inventory_parts(site_objs[s], inventory, what)
        with torch.no_grad():
            pairs = [lora_factors_of(p) for p in parts]
            A = torch.stack([a.float() for a, _ in pairs]).mean(0)
            B = torch.stack([b.float() * p.scaling for (_, b), p in zip(pairs, parts)]).mean(0)
        factors[s] = (A, B)
    return install_lora(pm, name, factors, provenance={"operation": "mhr_mu", "inventory": inventory,
                                                       "weights": [1.0 / len(inventory)] * len(inventory)},
                        activate=activate, overwrite=overwrite)


SPEC = MethodSpec(
    name="poly",
    config_cls=PolyConfig,
    make_part=PolyPart,
    fill_defaults=_fill_defaults,
    accepts=lambda m: isinstance(m, LINEAR_TYPES),
    summary="Poly / MHR: learned (multi-head) weight-space mixture of an inventory of LoRA skills",
)
