"""Arrow routing (Ostapenko et al., "Towards Modular LLMs by Building and Reusing a
Library of LoRAs", 2024): per-token, training-free mixing of a library of LoRAs.

An Arrow adapter is an ordinary adapter whose config names a library of LoRA adapters
already in the model (``ArrowConfig(library=["a", "b", "c"], top_k=1)``); it gets one
part at every Linear-like site where any of them acts and has no parameters of its
own. At such a site, for the library LoRAs present there (``i = 1..S``), each with
update ``delta_W_i = s_i B_i A_i``:

    v_i       = top right singular vector of delta_W_i           (its *prototype*)
    logit_i   = |<x, v_i>| / temperature                         (per token x)
    kept      = the top_k logits (top_k capped at S)
    w         = softmax over the kept logits
    out       = y + sum_{i kept} w_i * s_i B_i A_i x              (y: the output beneath)

The prototypes come from the factors alone (QR of ``A^T`` and ``B``, then the SVD of
an ``r x r`` matrix), never from the dense ``delta_W``; they are cached on the part and
recomputed when a library tensor changes (tensor version counters) — e.g. after a
training step or a reload of a library LoRA. The sign of a singular vector is
arbitrary, which ``|.|`` makes irrelevant. Routing is not differentiable (the
prototypes are computed without gradients); the mixed updates are, so library LoRAs
can still be trained through an Arrow adapter if one wishes. Library dropout is not
applied in the mixture. PiSSA library LoRAs count as the rank-2r LoRA they equal.

The mixture runs on the batched per-row kernels with tokens as rows: one gathered
``lora_delta`` call per kept rank (``k = 1..top_k``), whatever the library's size.
Library LoRAs of different ranks are zero-padded to the largest rank in the site's
bank (zero rows/columns add nothing).

The part reaches the library's parts through the :class:`~polyadapter.sites.Site`
that holds it: ``fill_defaults`` (which sees the model) hands the site objects to
``make_part`` through a private, non-saved attribute of the config, and the part keeps
a plain (unregistered) reference to its Site, so the library's weights are neither
copied nor saved twice. Library LoRAs must be present to run: adding or loading an
Arrow adapter without them fails before anything changes, the model refuses to remove
one while the Arrow adapter exists, and a merged one makes the forward pass fail with
a clear :class:`StateError`.
Arrow has no weight-space form (the mixture depends on each token), so it cannot be
merged.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..compose import first_tensor
from ..config import MIN_TEMPERATURE, AdapterConfig
from ..errors import AdapterNameError, ConfigError, StateError
from ..kernels import lora_delta
from ..sites import LINEAR_TYPES, sites_of
from .spec import MethodSpec


@dataclass
class ArrowConfig(AdapterConfig):
    """``library``: names of the LoRA adapters routed over (at least two, distinct).
    ``top_k``: how many LoRAs each token mixes (capped, per site, at the number of
    library LoRAs acting there). ``temperature``: divides the routing logits before
    the softmax. ``targets`` is filled in with the Linear-like sites where any
    library LoRA acts (and saved, so loading re-checks them)."""

    method: ClassVar[str] = "arrow"
    library: list[str] | None = None
    top_k: int = 1
    temperature: float = 1.0

    def validate(self):
        if isinstance(self.library, tuple):
            self.library = list(self.library)
        self.require(isinstance(self.library, list) and len(self.library) >= 2
                     and all(isinstance(a, str) and a for a in self.library)
                     and len(set(self.library)) == len(self.library),
                     "library", "a list of at least two distinct LoRA adapter names")
        self.require(isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                     and 1 <= self.top_k <= len(self.library), "top_k",
                     f"an integer from 1 to the library's size ({len(self.library)})")
        self.require(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
                     and self.temperature >= MIN_TEMPERATURE, "temperature",
                     f"a number of at least {MIN_TEMPERATURE:g} (smaller ones turn the scores into inf "
                     f"and the outputs into NaN)")
        self.require(not self.modules_to_save, "modules_to_save", "empty (routing adapters save no module copies)")


# ---------------------------------------------------------------------- shared with poly.py
def check_members(model: nn.Module, config, names: list[str], role: str) -> dict[str, dict]:
    """Site name -> {member name: its LoRA part} for the Linear-like sites where any of
    ``names`` (LoRA adapters of this model) acts. Raises before anything changes when
    a name is unknown or not a LoRA adapter."""
    state = _state_of(model)
    what = f"{config.method} config"
    for n in names:
        if state is None or n not in state.adapters:
            known = sorted(state.adapters) if state is not None else []
            raise AdapterNameError(f"{what}: {role} adapter {n!r} is not in this model (adapters: {known}); "
                                   f"add or load the {role} LoRAs before the {config.method} adapter")
        method = state.adapters[n].config.method
        if method != "lora":
            raise ConfigError(f"{what}: {role} adapter {n!r} is a {method} adapter; {config.method} "
                              f"routes over LoRA adapters only")
    out: dict[str, dict] = {}
    for site_name, site in sites_of(model).items():
        if not isinstance(site.base, LINEAR_TYPES):
            continue
        members = {n: site.adapters[n] for n in names
                   if n in site.adapters and site_name in state.adapters[n].sites}
        if members:
            out[site_name] = members
    return out


def _state_of(model: nn.Module):
    for site in sites_of(model).values():
        return site.state
    return None


def bind_sites(model: nn.Module, config):
    """A copy of ``config`` carrying weak references to the model's sites for
    ``make_part`` (a private attribute: not a field, so never saved or compared)."""
    config = config.replace()
    config._sites = {n: weakref.ref(s) for n, s in sites_of(model).items()}
    return config


def bound_site(config, site_name: str, what: str):
    refs = getattr(config, "_sites", None)
    site = refs[site_name]() if refs is not None and site_name in refs else None
    if site is None:
        raise ConfigError(f"{what}: site {site_name!r} holds none of its adapters; target only sites where "
                          f"they act (leave targets unset to find them)")
    return site


def member_part(site, requester: nn.Module, name: str, role: str):
    """The LoRA part of ``name`` at ``site`` (None when it does not act there), for the
    routing part ``requester``; raises a StateError when that LoRA left the model,
    changed kind, or is merged into the base here."""
    adapters = site.state.adapters
    record = adapters.get(name)
    problem = None
    if record is None:
        problem = f"routes over {role} LoRA {name!r}, which is no longer in the model; add or load it back"
    elif record.config.method != "lora":
        problem = f"{role} adapter {name!r} is now a {record.config.method} adapter, not a LoRA"
    elif site.site_name in record.sites and name in site.merged:
        problem = (f"{role} LoRA {name!r} is merged into the base at site {site.site_name!r}; unmerge it to "
                   f"route over it")
    if problem is not None:
        owner = next((n for n, p in site.adapters.items() if p is requester), "?")
        raise StateError(f"adapter {owner!r}: {problem}")
    if site.site_name not in record.sites or name not in site.adapters:
        return None   # not acting here (or only a modules_to_save copy here)
    return site.adapters[name]


def lora_factors_of(part) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of a LoRA part, PiSSA parts as the rank-2r LoRA they equal
    (``[A; A0]``, ``[B, -B0]``). Not detached: gradients flow when they are wanted."""
    A, B = part.lora_A, part.lora_B
    if part.pissa:
        A = torch.cat([A, part.lora_A0], dim=0)
        B = torch.cat([B, -part.lora_B0], dim=1)
    return A, B


def part_tensors(part) -> list[torch.Tensor]:
    return list(part.parameters()) + list(part.buffers())


def tensors_key(tensors: list[torch.Tensor]) -> tuple:
    """Identity and in-place version of each tensor: changes when any is replaced or modified."""
    return tuple((id(t), t._version) for t in tensors)


def cache_usable(cached: list) -> bool:
    """False for tensors cached under ``torch.inference_mode`` when it is now off (such
    tensors cannot take part in autograd, so they are rebuilt)."""
    return torch.is_inference_mode_enabled() or not any(t is not None and t.is_inference() for t in cached)


def _needs_grad(tensors: list[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------------- prototypes
def prototypes(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right singular vectors of ``B[i] @ A[i]`` for a stack of LoRAs, (S, in), from
    the factors: with ``A^T = Qa Ra`` and ``B = Qb Rb``, ``B A = Qb (Rb Ra^T) Qa^T``, so
    the right singular vectors are ``Qa`` times those of the small ``Rb Ra^T``."""
    A, B = A.detach().float(), B.detach().float()
    Qa, Ra = torch.linalg.qr(A.transpose(1, 2))        # (S, in, q), (S, q, r)
    Rb = torch.linalg.qr(B).R                          # B = Qb Rb: Rb (S, p, r)
    small = Rb @ Ra.transpose(1, 2)                    # (S, p, q)
    Vh = torch.linalg.svd(small, full_matrices=False).Vh  # (S, min(p, q), q)
    return (Qa @ Vh[:, 0, :, None]).squeeze(-1)        # (S, in)


def _pad_rank(A: torch.Tensor, B: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = r - A.shape[0]
    if extra == 0:
        return A, B
    return (torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0),
            torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1))


def stack_library(parts: list) -> dict:
    """The site's library bank: A (S, R, in), B (S, out, R), scale (S,), zero-padded to
    the largest rank R."""
    factors = [lora_factors_of(p) for p in parts]
    r = max(A.shape[0] for A, _ in factors)
    padded = [_pad_rank(A, B, r) for A, B in factors]
    return {"A": torch.stack([a for a, _ in padded]), "B": torch.stack([b for _, b in padded]),
            "scale": torch.tensor([float(p.scaling) for p in parts], dtype=torch.float32,
                                  device=padded[0][0].device)}


class ArrowPart(nn.Module):
    """Arrow at one site: no parameters; reads the library's parts from its Site."""

    def __init__(self, base: nn.Module, config: ArrowConfig, site: str):
        super().__init__()
        what = f"arrow adapter at site {site!r}"
        bound = bound_site(config, site, what)
        acting = [n for n in config.library if n in bound.adapters and site in bound.state.adapters[n].sites]
        if not acting:
            raise ConfigError(f"{what}: none of the library LoRAs {config.library} acts at this site; target "
                              f"only sites where they act (leave targets unset to find them)")
        object.__setattr__(self, "site", bound)   # not a submodule: nothing duplicated or saved twice
        self.library = list(config.library)
        self.top_k = int(config.top_k)
        self.temperature = float(config.temperature)
        object.__setattr__(self, "_cache", None)

    def present(self) -> tuple[list[str], list]:
        """(names, parts) of the library LoRAs acting at this site, in library order."""
        names, parts = [], []
        for n in self.library:
            part = member_part(self.site, self, n, "library")
            if part is not None:
                names.append(n)
                parts.append(part)
        return names, parts

    def routing_state(self) -> tuple[list[str], torch.Tensor, dict]:
        """(names, prototypes (S, in) float32, bank) at this site, cached until a library
        tensor changes; the bank is stacked afresh (differentiable) when gradients flow."""
        names, parts = self.present()
        tensors = [t for p in parts for t in part_tensors(p)]
        key = (tuple(names), tensors_key(tensors))
        cache = self._cache
        if cache is None or cache[0] != key or not cache_usable([cache[1]] + list((cache[2] or {}).values())):
            with torch.no_grad():
                bank = stack_library(parts) if parts else None
                protos = prototypes(bank["A"], bank["B"]) if parts else None
            cache = (key, protos, bank)
            object.__setattr__(self, "_cache", cache)
        bank = cache[2]
        if parts and _needs_grad(tensors):
            bank = stack_library(parts)
        return names, cache[1], bank

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per token of ``x`` (..., in): (indices (N, k) into the site's present library,
        weights (N, k) float32), or None when no library LoRA acts here."""
        names, protos, _ = self.routing_state()
        if not names:
            return None
        return self._route(x.reshape(-1, x.shape[-1]), protos)

    def _route(self, tokens: torch.Tensor, protos: torch.Tensor):
        logits = (tokens.detach().float() @ protos.to(tokens.device).T).abs() / self.temperature   # (N, S)
        k = min(self.top_k, protos.shape[0])
        top, idx = torch.topk(logits, k, dim=-1)
        return idx, torch.softmax(top, dim=-1)

    def apply(self, inner, x):
        y = inner(x)
        names, protos, bank = self.routing_state()
        if not names:
            return y
        first, rest = first_tensor(y)
        tokens = x.reshape(-1, x.shape[-1])
        idx, weights = self._route(tokens, protos)
        rows = tokens.unsqueeze(1)                                                    # tokens as rows
        weights = weights.to(tokens.dtype)
        delta = None
        for k in range(idx.shape[1]):   # one gathered LoRA call per kept rank, not per library LoRA
            # LoRA is linear in x: w * LoRA(x) = LoRA(w * x), so each call adds its weighted share.
            delta = lora_delta(rows * weights[:, k, None, None], bank["A"], bank["B"], idx[:, k].contiguous(),
                               bank["scale"], out=delta)
        new = first + delta.reshape(first.shape).to(first.dtype)
        return new if rest is None else (new,) + rest

    def extra_repr(self) -> str:
        return f"library={self.library}, top_k={self.top_k}, temperature={self.temperature}"


def _fill_defaults(model: nn.Module, config: ArrowConfig) -> ArrowConfig:
    sites = check_members(model, config, config.library, "library")
    if config.targets is None:
        if not sites:
            raise ConfigError(f"arrow config: none of the library LoRAs {config.library} acts at a Linear-like "
                              f"site of this model")
        config = config.replace(targets=list(sites))
    return bind_sites(model, config)


SPEC = MethodSpec(
    name="arrow",
    config_cls=ArrowConfig,
    make_part=ArrowPart,
    fill_defaults=_fill_defaults,
    accepts=lambda m: isinstance(m, LINEAR_TYPES),
    summary="Arrow: training-free per-token routing over a library of LoRAs (top-k by prototype similarity)",
)
