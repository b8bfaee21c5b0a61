"""Shared-basis LoRAs ("Compress then Serve", Gabrielsson et al. 2024): many LoRAs
served through one basis.

At a site, LoRA ``i``'s update ``delta_i = s_i B_i A_i`` (out x in) is stored as
``U Sigma_i V^T``: ``U`` (out x k) and ``V`` (in x k) are shared by a whole collection
of adapters, and each adapter keeps only a small ``Sigma_i`` (k x k). Two methods:

- ``basis`` (:class:`BasisConfig`): holds ``U`` and ``V`` at every site (buffers,
  or parameters with ``trainable=True``). It has no per-adapter weights, so it never
  runs by itself: activating it (alone, in a block or as a row's setup) raises.
- ``basis_lora`` (:class:`BasisLoraConfig`): holds ``sigma`` (k x k, a parameter)
  at every site and names its basis; at a site it computes ``y + U (Sigma (V^T x))``
  with the basis part found in the same Site, so the basis exists once in memory and
  once on disk (a basis_lora file holds only its ``sigma`` tensors and the basis name).

``polyadapter.ops.shared_basis.compress_to_shared_basis`` fits a basis to several
LoRAs and installs it with one basis_lora per source.

Linking: a basis_lora part keeps a reference (not a submodule, so nothing is saved or
moved twice) to the ``adapters`` dict of its Site and looks its basis up there on
every call, so nothing can run a stale copy (the model refuses to remove the basis
while basis_lora adapters use it). The basis must be in the model before a basis_lora
is added or loaded (``fill_defaults`` refuses otherwise and makes the links).

Mixed batches: all rows using basis_lora adapters of one basis at a site form one
bank and run as three batched products whatever the number of adapters:
``h = x V`` (shared by every row), ``h_row = h_row Sigma_row^T`` (one ``bmm`` over the
rows' gathered ``Sigma``, n x k x k), and ``h U^T`` (shared).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError, StateError
from ..sites import LINEAR_TYPES, linear_dims, pattern_value, sites_of
from .spec import MethodSpec, with_preset_targets


def _dims(module: nn.Module) -> tuple[int, int, bool, bool]:
    """(in, out, is_embedding, is_conv1d) in the (out, in) convention of LoRA factors."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim, True, False
    in_f, out_f = linear_dims(module)
    return in_f, out_f, False, not isinstance(module, nn.Linear)


def _accepts(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES + (nn.Embedding,))


# ---------------------------------------------------------------------- basis
@dataclass
class BasisConfig(AdapterConfig):
    """``rank``: the basis width k at every site (``rank_pattern``: per-site values,
    patterns as in ``targets``). ``trainable``: hold ``U``/``V`` as parameters rather
    than buffers. ``basis_id``: a fingerprint of the fitted basis, written by
    ``compress_to_shared_basis``; basis_lora adapters fitted against it carry the same
    id, and one fitted against another basis is refused."""

    method: ClassVar[str] = "basis"
    pattern_fields: ClassVar[tuple[str, ...]] = ("targets", "modules_to_save", "rank_pattern")
    rank: int = 8
    rank_pattern: dict[str, int] | None = None
    trainable: bool = False
    basis_id: str | None = None

    def validate(self):
        self.require(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
                     "rank", "a positive integer")
        self.require(self.rank_pattern is None or (isinstance(self.rank_pattern, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in self.rank_pattern.items())), "rank_pattern", "a dict of site pattern -> positive int")
        self.require(isinstance(self.trainable, bool), "trainable", "true or false")
        self.require(self.basis_id is None or (isinstance(self.basis_id, str) and self.basis_id),
                     "basis_id", "a non-empty string or null")
        self.require(not self.modules_to_save, "modules_to_save",
                     "empty (a basis holds no module copies; its basis_lora adapters may)")

    def rank_for(self, site: str) -> int:
        return pattern_value(self.rank_pattern, site, self.rank)


class BasisPart(nn.Module):
    """``U`` (out, k) and ``V`` (in, k) at one site."""

    def __init__(self, base: nn.Module, config: BasisConfig, site: str):
        super().__init__()
        in_f, out_f, self.is_embedding, self.is_conv1d = _dims(base)
        k = config.rank_for(site)
        if k > min(in_f, out_f):
            raise ConfigError(f"basis config: rank {k} at site {site!r} exceeds min(in, out) = {min(in_f, out_f)}")
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        U, V = torch.zeros(out_f, k, **kw), torch.zeros(in_f, k, **kw)
        if config.trainable:
            self.U, self.V = nn.Parameter(U), nn.Parameter(V)
        else:
            self.register_buffer("U", U)
            self.register_buffer("V", V)
        object.__setattr__(self, "site_name", site)

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def apply(self, inner, x):
        raise StateError(
            f"a basis adapter (method 'basis', site {self.site_name!r}) cannot run by itself: it holds only the "
            f"shared U, V of compressed LoRAs and no per-adapter weights; activate one of the basis_lora "
            f"adapters built on it instead")


def _fill_basis(model: nn.Module, config: BasisConfig) -> BasisConfig:
    return with_preset_targets(model, config, "lora")


# ---------------------------------------------------------------------- basis_lora
@dataclass
class BasisLoraConfig(AdapterConfig):
    """``basis``: name of the basis adapter this adapter's ``sigma`` matrices belong
    to; it must be in the model first. ``targets``: the basis's sites when unset.
    ``basis_id``: the fingerprint of the basis it was fitted against (see
    :class:`BasisConfig`), checked when both are known."""

    method: ClassVar[str] = "basis_lora"
    basis: str | None = None
    basis_id: str | None = None

    def validate(self):
        self.require(isinstance(self.basis, str) and bool(self.basis), "basis", "the name of a basis adapter")
        self.require(self.basis_id is None or (isinstance(self.basis_id, str) and self.basis_id),
                     "basis_id", "a non-empty string or null")


# Attribute set on a filled-in BasisLoraConfig: site -> weak reference to that Site's ``adapters``
# (weak, so the record's config never keeps modules alive and copies of it stay cheap).
_LINKS = "_basis_site_adapters"


def _fill_basis_lora(model: nn.Module, config: BasisLoraConfig) -> BasisLoraConfig:
    """Check the basis is present (and the right one), default the targets to its
    sites, and hand the parts their links to the basis (on the returned copy only:
    the link is no config field, so it is never saved or compared)."""
    holders = {name: site for name, site in sites_of(model).items() if config.basis in site.adapters}
    if not holders:
        raise ConfigError(
            f"basis_lora config: its basis adapter {config.basis!r} is not in this model; add or load the basis "
            f"adapter first (a basis_lora adapter stores only its small sigma matrices and uses the basis's U, V)")
    site = next(iter(holders.values()))
    if not isinstance(site.adapters[config.basis], BasisPart):
        method = site.state.adapters[config.basis].config.method if config.basis in site.state.adapters else "?"
        raise ConfigError(f"basis_lora config: adapter {config.basis!r} is a {method} adapter, not a basis")
    record = site.state.adapters.get(config.basis)
    have = getattr(record.config, "basis_id", None) if record is not None else None
    if config.basis_id and have and config.basis_id != have:
        raise ConfigError(
            f"basis_lora config: it was fitted against basis {config.basis_id!r}, but adapter {config.basis!r} "
            f"is basis {have!r}; its sigma matrices only make sense with the basis they were fitted with")
    filled = config.replace(targets=list(holders) if config.targets is None else list(config.targets))
    object.__setattr__(filled, _LINKS, {n: weakref.ref(s.adapters) for n, s in holders.items()})
    return filled


class BasisLoraPart(nn.Module):
    """``sigma`` (k, k) at one site; the update is ``U @ sigma @ V.T`` with the basis's U, V."""

    def __init__(self, base: nn.Module, config: BasisLoraConfig, site: str):
        super().__init__()
        links = getattr(config, _LINKS, None)
        if links is None:
            raise ConfigError("basis_lora parts are made by AdapterModel.add_adapter / load_adapter, which first "
                              "link them to their basis adapter")
        adapters = links[site]() if site in links else None
        if adapters is None:
            raise ConfigError(f"basis_lora config: the basis adapter {config.basis!r} has no part at site {site!r}; "
                              f"a basis_lora adapter can only target sites of its basis")
        object.__setattr__(self, "site_adapters", adapters)   # a reference, not a submodule
        object.__setattr__(self, "site_name", site)
        self.basis_name = config.basis
        _, _, self.is_embedding, self.is_conv1d = _dims(base)
        basis = self.basis()
        self.sigma = nn.Parameter(torch.zeros(basis.rank, basis.rank, device=basis.U.device, dtype=basis.U.dtype))

    def basis(self) -> BasisPart:
        """The basis part at this site, looked up afresh (it may have been removed)."""
        part = self.site_adapters[self.basis_name] if self.basis_name in self.site_adapters else None
        if not isinstance(part, BasisPart):
            raise StateError(f"basis adapter {self.basis_name!r} is no longer at site {self.site_name!r} (was it "
                             f"removed?); the basis_lora adapters built on it cannot run without it")
        return part

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        b = self.basis()
        V = b.V if self.is_embedding else b.V.to(x.dtype)
        h = F.embedding(x, V) if self.is_embedding else torch.matmul(x, V)
        return torch.matmul(torch.matmul(h, self.sigma.T.to(h.dtype)), b.U.T.to(h.dtype))

    def apply(self, inner, x):
        y = inner(x)
        return y + self.delta(x).to(y.dtype)

    # -------------------------------------------------------- mixed batches
    row_role = "delta_in"

    def bucket_key(self) -> tuple:
        """Every basis_lora of one basis at a site shares one bank."""
        return ("basis_lora", self.basis_name, tuple(self.sigma.shape), self.is_embedding, self.sigma.dtype)

    @staticmethod
    def stack_bank(parts: list["BasisLoraPart"]) -> dict:
        # U, V are not copied into the bank: ``resolve`` finds the basis on every call.
        return {"sigma": torch.stack([p.sigma for p in parts]), "resolve": parts[0].basis,
                "embedding": parts[0].is_embedding}

    @staticmethod
    def bank_forward(bank: dict, x, out, slots, in_place: bool, training: bool):
        """``out`` plus every row's own ``U Sigma_row V^T x``: ``x V`` and ``(.) U^T`` run
        once for all rows, only the k x k ``Sigma`` is gathered per row."""
        basis = bank["resolve"]()
        n, width = x.shape[0], out.shape[-1]
        if bank["embedding"]:
            h = F.embedding(x.reshape(n, -1), basis.V)                                  # (n, L, k)
        else:
            h = torch.matmul(x.reshape(n, -1, x.shape[-1]), basis.V.to(x.dtype))        # (n, L, k)
        sigma = bank["sigma"].index_select(0, slots).to(h.dtype)                       # (n, k, k)
        h = torch.bmm(h, sigma.transpose(1, 2)).reshape(-1, sigma.shape[-1])           # (n*L, k)
        U = basis.U.to(h.dtype)
        flat = out.reshape(-1, width)
        if in_place and flat.data_ptr() == out.data_ptr() and flat.dtype == h.dtype:
            flat.addmm_(h, U.T)
            return out
        return out + torch.mm(h, U.T).view(out.shape).to(out.dtype)

    # -------------------------------------------------------- weight space
    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's own layout."""
        b = self.basis()
        w = b.U @ self.sigma @ b.V.T
        return w.T if (self.is_conv1d or self.is_embedding) else w

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        base.weight.add_(self.delta_weight().to(base.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        base.weight.sub_(self.delta_weight().to(base.weight.dtype))


SPEC_BASIS = MethodSpec(
    name="basis",
    config_cls=BasisConfig,
    make_part=BasisPart,
    fill_defaults=_fill_basis,
    accepts=_accepts,
    summary="shared basis U, V of compressed LoRAs (used by basis_lora adapters; never active alone)",
)

SPEC_BASIS_LORA = MethodSpec(
    name="basis_lora",
    config_cls=BasisLoraConfig,
    make_part=BasisLoraPart,
    fill_defaults=_fill_basis_lora,
    accepts=_accepts,
    summary="a LoRA stored as U @ sigma @ V.T over a shared basis adapter (only sigma is its own)",
)
SPECS = [SPEC_BASIS, SPEC_BASIS_LORA]
