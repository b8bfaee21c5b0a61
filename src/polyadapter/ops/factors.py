"""Reading adapters as per-site tensors, and installing computed LoRAs.

A LoRA's update at a site is ``delta_W = scaling * B @ A`` in the ``(out, in)`` layout of
``nn.Linear`` (for Hugging Face ``Conv1D`` and ``nn.Embedding`` sites too: this module
always speaks ``(out, in)``; the part converts when merging).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, StateError
from ..methods.lora import LoraConfig


@dataclass
class LoraFactors:
    """One LoRA at one site: ``delta = scaling * B @ A`` with A (r, in), B (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B.float() @ self.A.float())


def lora_factors(pm, name: str) -> dict[str, LoraFactors]:
    """Site -> the factors of LoRA adapter ``name`` (detached float32 copies).

    PiSSA adapters are read as the rank-2r LoRA they are equivalent to
    (``[A; A0]``, ``[B, -B0]``), so every caller sees plain factors."""
    record = pm.record(name)
    if record.config.method != "lora":
        raise ConfigError(f"adapter {name!r} is a {record.config.method} adapter; this operation needs LoRA adapters")
    if getattr(record.config, "use_dora", False):
        raise ConfigError(f"adapter {name!r} is a DoRA adapter: its magnitude vector rescales the whole weight, so "
                          f"it is not the low-rank update this operation reads; merge it into the base instead")
    out = {}
    for site, part in pm.parts(name).items():
        if site not in record.sites:
            continue  # modules_to_save copies are not factors
        A, B = part.lora_A.detach().float(), part.lora_B.detach().float()
        if part.pissa:
            A = torch.cat([A, part.lora_A0.float()], dim=0)
            B = torch.cat([B, -part.lora_B0.float()], dim=1)
        out[site] = LoraFactors(A.clone(), B.clone(), float(part.scaling))
    return out


def source_names(pm, adapters, where: str, kind: str = "adapter", purpose: str = "to combine") -> list[str]:
    """``adapters`` as a list of existing adapter names, or a ConfigError saying what is
    wrong (not a list, empty, an unknown name)."""
    if isinstance(adapters, str) or not hasattr(adapters, "__len__"):
        raise ConfigError(f"{where}: adapters must be a list of {kind} names; found {adapters!r}")
    adapters = list(adapters)
    if not adapters:
        raise ConfigError(f"{where}: give at least one {kind} {purpose}")
    for a in adapters:
        if a not in pm.adapters:
            raise ConfigError(f"{where}: no adapter named {a!r}; adapters: {pm.adapters}")
    return adapters


def delta_weights(pm, name: str) -> dict[str, torch.Tensor]:
    """Site -> the LoRA's weight update ``scaling * B @ A`` (float32, (out, in))."""
    return {s: f.delta() for s, f in lora_factors(pm, name).items()}


def install_lora(pm, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, alpha: float | None = None,
                 modules_from: str | None = None, provenance: dict | None = None,
                 activate: bool = False, overwrite: bool = False):
    """Install a LoRA adapter ``name`` whose factors at each site are ``(A, B)`` with
    scaling 1 by default (``alpha`` = each site's rank, so ``delta = B @ A``).

    Ranks may differ per site (``rank_pattern``). ``modules_from``: copy that adapter's
    ``modules_to_save`` (e.g. a task's classification head) into the new adapter.
    ``overwrite`` replaces an existing adapter of that name (not a merged one). The
    new adapter is planned in full before anything is installed, so a failure leaves
    the model as it was. Returns the new adapter's record."""
    if not factors:
        raise ConfigError(f"adapter {name!r}: no sites to install")
    sites = list(factors)
    ranks = {s: int(A.shape[0]) for s, (A, B) in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    rank_pattern = {s: v for s, v in ranks.items() if v != r} or None
    if alpha is None:
        alpha_value, alpha_pattern = float(r), {s: float(v) for s, v in ranks.items() if v != r} or None
    else:
        alpha_value, alpha_pattern = float(alpha), None
    saved = []
    if modules_from is not None:
        saved = list(pm.record(modules_from).saved_modules)
    config = LoraConfig(r=r, alpha=alpha_value, targets=sites, modules_to_save=saved,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    old = None
    if name in pm.adapters:
        if not overwrite:
            raise StateError(f"an adapter named {name!r} already exists; pass overwrite=True to replace it")
        old = name
        name = _temporary_name(pm, name)
    plan = pm.plan_adapter(name, config)
    tensors = {}
    for s, (A, B) in factors.items():
        part = plan.parts[s]
        tensors[f"{s}.lora_A"] = A.to(part.lora_A.dtype)
        tensors[f"{s}.lora_B"] = B.to(part.lora_B.dtype)
    if modules_from is not None:
        for s, copy in pm.parts(modules_from).items():
            if s in saved:
                tensors.update({f"{s}.{k}": v for k, v in copy.state_dict().items()})
    for k, v in plan.state_dict().items():
        if k not in tensors:
            raise ConfigError(f"adapter {name!r}: nothing computed for {k!r}")
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise ConfigError(f"adapter {name!r}: {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(v.shape)}")
    plan.load_tensors(tensors)
    plan.record.provenance = dict(provenance or {})
    if old is not None:
        was_active = old in pm.active_adapters
        pm.remove_adapter(old)
        pm.install(plan)
        _rename(pm, name, old)
        name = old
        if was_active:
            pm.set_active(name)
    else:
        pm.install(plan)
    if activate:
        pm.set_active(name)
    return pm.record(name)


def _temporary_name(pm, name: str) -> str:
    i = 0
    while f"{name[:56]}-tmp{i}" in pm.adapters:
        i += 1
    return f"{name[:56]}-tmp{i}"


def _rename(pm, old: str, new: str) -> None:
    """Rename an installed adapter (used to swap in a replacement atomically)."""
    from ..sites import sites_of
    record = pm.state.adapters.pop(old)
    record.name = new
    pm.state.adapters[new] = record
    sites = sites_of(pm.model)
    for s in record.sites + record.saved_modules:
        sites[s].adapters[new] = sites[s].adapters.pop(old)

