"""Sparse fine-tuning: a trainable update on a fixed, small set of weight entries.

This is the storage form of composable sparse fine-tuning (Ansell et al., "Composable
Sparse Fine-Tuning for Cross-Lingual Transfer") and of sparse high-rank adapters
(SHiRA): an adapter is a list of positions in a weight plus a value for each. Unlike
LoRA the update is not low-rank, and because updates to disjoint (or even
overlapping) positions simply add, several sparse adapters compose by summation —
which is also why merging into the base and back out is exact up to float rounding.

Positions are chosen once, when the adapter is created, and then frozen:
``random`` (default; reproducible from ``seed`` and the site name) or ``magnitude``
(the largest ``|W|`` entries) — a cheap stand-in for the lottery-ticket selection
Ansell et al. use (fine-tune fully, keep the entries that moved most), which would
need a full training run before the adapter even exists.

Per site the part stores a persistent buffer ``indices`` (int64 flat positions into
the weight *in its stored layout*: (out, in) for ``nn.Linear``, (in, out) for HF's
``Conv1D``; sorted, unique) and a parameter ``values`` of the same length, zero at
initialisation so the model starts exactly at the base. ``indices`` is saved with the
adapter, so a file is self-describing and never depends on re-running selection.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import LoadError
from ..sites import LINEAR_TYPES
from .spec import MethodSpec, with_preset_targets

SELECTIONS = ("random", "magnitude")


@dataclass
class SparseConfig(AdapterConfig):
    """``density``: share of each target weight's entries that are trainable, in
    (0, 1]; every site gets at least one. ``selection``: ``random`` | ``magnitude``.
    ``seed``: with the site name, fixes the ``random`` positions, so the same config
    on the same model always picks the same entries."""

    method: ClassVar[str] = "sparse"
    density: float = 0.01
    selection: str = "random"
    seed: int = 0

    def validate(self):
        self.require(isinstance(self.density, (int, float)) and not isinstance(self.density, bool)
                     and 0 < self.density <= 1, "density", "a number in (0, 1]")
        self.require(self.selection in SELECTIONS, "selection", f"one of {list(SELECTIONS)}")
        self.require(isinstance(self.seed, int) and not isinstance(self.seed, bool), "seed", "an integer")


def num_entries(numel: int, density: float) -> int:
    """How many entries a weight of ``numel`` entries gets at ``density``."""
    return min(numel, max(1, round(density * numel)))


class SparsePart(nn.Module):
    def __init__(self, base: nn.Module, config: SparseConfig, site: str):
        super().__init__()
        weight = base.weight
        self.site = site
        self.shape = tuple(weight.shape)
        self.numel = weight.numel()
        self.is_conv1d = not isinstance(base, nn.Linear)
        k = num_entries(self.numel, config.density)
        if config.selection == "magnitude":
            idx = torch.topk(weight.detach().abs().flatten(), k, sorted=False).indices
        else:
            idx = _random_positions(self.numel, k, _site_seed(config.seed, site))
        self.register_buffer("indices", torch.sort(idx.to(device=weight.device, dtype=torch.int64)).values)
        self.values = nn.Parameter(torch.zeros(k, device=weight.device, dtype=weight.dtype))

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense tensor in the base weight's stored layout.

        Dense scatter is the simple, autograd-friendly form: its gradient with respect
        to ``values`` is the gradient of the dense update gathered at ``indices``, and
        no gradient is ever formed for the frozen positions. It costs one weight-sized
        temporary per forward, the same as the base matmul reads anyway."""
        flat = torch.zeros(self.numel, device=self.values.device, dtype=self.values.dtype)
        return flat.scatter(0, self.indices, self.values).view(self.shape)

    def apply(self, inner, x):
        delta = self.delta_weight().to(x.dtype)
        # Linear computes x @ W.T (W is (out, in)); Conv1D computes x @ W (W is (in, out)).
        return inner(x) + (x @ delta if self.is_conv1d else F.linear(x, delta))

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        self._add_to(base.weight, self.values)

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        self._add_to(base.weight, -self.values)

    def _add_to(self, weight: torch.Tensor, values: torch.Tensor) -> None:
        values = values.to(weight.dtype)
        if weight.is_contiguous():
            weight.view(-1).index_add_(0, self.indices, values)
        else:  # a strided view cannot be flattened in place; go through a dense update
            flat = torch.zeros(self.numel, device=weight.device, dtype=weight.dtype)
            weight.add_(flat.index_add_(0, self.indices, values).view(self.shape))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Files come from outside: an index out of range would write outside the weight
        # on merge (or crash inside scatter), and a repeated index makes scatter's result
        # depend on thread order. Refuse both before anything is copied, so the load
        # stops while the adapter is still only a plan and the model is untouched.
        idx = state_dict.get(prefix + "indices")
        if idx is not None:
            check_indices(idx, self.numel, f"site {self.site!r}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"k={self.values.numel()}, weight_shape={self.shape}"


def check_indices(idx: torch.Tensor, numel: int, where: str) -> None:
    """Raise LoadError unless ``idx`` is a 1-D tensor of unique integer positions in
    ``[0, numel)``."""
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise LoadError(f"sparse adapter, {where}: indices must be integers; found dtype {idx.dtype}")
    if idx.dim() != 1:
        raise LoadError(f"sparse adapter, {where}: indices must be 1-D; found shape {tuple(idx.shape)}")
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= numel:
        bad = lo if lo < 0 else hi
        raise LoadError(f"sparse adapter, {where}: index {bad} is out of range for a weight of "
                        f"{numel} entries (expected 0 <= index < {numel})")
    if torch.unique(idx).numel() != idx.numel():
        raise LoadError(f"sparse adapter, {where}: indices repeat "
                        f"({idx.numel() - torch.unique(idx).numel()} duplicate(s)); each position may appear once")


def _site_seed(seed: int, site: str) -> int:
    # Python's hash() is salted per process; crc32 keeps selection reproducible across runs.
    return (seed * 1_000_003 + zlib.crc32(site.encode())) % (2**63)


def _random_positions(numel: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct positions in ``[0, numel)``, uniformly at random.

    For small ``k`` (the usual case) this avoids a ``randperm(numel)`` over a large
    weight: draw with replacement, keep the distinct ones, and pick ``k`` of them at
    random (a random subset of a uniformly random set is uniformly random)."""
    gen = torch.Generator().manual_seed(seed)
    if 2 * k > numel:
        return torch.randperm(numel, generator=gen)[:k]
    pool = torch.empty(0, dtype=torch.int64)
    while pool.numel() < k:
        draw = torch.randint(0, numel, (2 * (k - pool.numel()) + 16,), generator=gen)
        pool = torch.unique(torch.cat([pool, draw]))
    return pool[torch.randperm(pool.numel(), generator=gen)[:k]]


SPEC = MethodSpec(
    name="sparse",
    config_cls=SparseConfig,
    make_part=SparsePart,
    fill_defaults=lambda model, cfg: with_preset_targets(model, cfg, "sparse"),
    accepts=lambda m: isinstance(m, LINEAR_TYPES),
    summary="trainable values at a fixed sparse set of weight entries (composable sparse fine-tuning)",
)
