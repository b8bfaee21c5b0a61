"""LoRA: a low-rank update ``scale * B @ A`` beside a Linear, Conv1D or Embedding.

Initialisations: ``default`` (A Kaiming-uniform, B zero: the model starts exactly at
the base; for embeddings A zero, B normal, as PEFT does), ``gaussian`` (A normal with
std 1/r, B zero) and ``pissa`` (A, B from the base weight's top-r singular triplets).

PiSSA normally rewrites the base weight to its residual. Here the base stays
untouched — other adapters share it — and the part keeps the initial factors as
frozen buffers ``A0, B0``, computing ``W x + s (B A - B0 A0) x``: the same function,
the same trainable subspace, and output equal to the base at initialisation.

DoRA (``use_dora=True``, Liu et al. 2024, as PEFT computes it): a trainable magnitude
``m`` per output channel times the direction of ``W + s B A``, normalised per output
channel: ``y = m / ||W + s B A|| * (W x + s B A x) + bias``. The norm is detached (no
gradient through it, the paper's section 4.3) and cached until the base weight, A, B
or the scaling changes (tensor version counters), so inference computes it once. It
starts at ``m = ||W||``, so the model starts exactly at the base. Merging writes
``m / ||W + s B A|| * (W + s B A)`` into the weight and keeps the factor to unmerge.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError
from ..kernels import lora_add_, lora_delta
from ..sites import LINEAR_TYPES, linear_dims, pattern_value
from .spec import MethodSpec, random_init_wanted, with_preset_targets

INITS = ("default", "gaussian", "pissa")


MAX_ALPHA = 1e6  # alpha / r multiplies every update; beyond this, fp32 outputs overflow to inf


@dataclass
class LoraConfig(AdapterConfig):
    method: ClassVar[str] = "lora"
    pattern_fields: ClassVar[tuple[str, ...]] = ("targets", "modules_to_save", "rank_pattern", "alpha_pattern")
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def validate(self):
        self.require(isinstance(self.r, int) and not isinstance(self.r, bool) and self.r > 0, "r", "a positive integer")
        self.require(isinstance(self.alpha, (int, float)) and 0 < self.alpha <= MAX_ALPHA, "alpha",
                     f"a positive number up to {MAX_ALPHA:g} (larger scalings overflow the outputs)")
        self.require(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")
        self.require(isinstance(self.use_rslora, bool), "use_rslora", "true or false")
        self.require(isinstance(self.use_dora, bool), "use_dora", "true or false")
        self.require(not (self.use_dora and self.init == "pissa"), "use_dora",
                     "false with init='pissa' (DoRA over PiSSA's offset factors is not supported)")
        self.require(self.init in INITS, "init", f"one of {list(INITS)}")
        self.require(self.rank_pattern is None or (isinstance(self.rank_pattern, dict) and all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v > 0
            for k, v in self.rank_pattern.items())), "rank_pattern", "a dict of site pattern -> positive int")
        self.require(self.alpha_pattern is None or (isinstance(self.alpha_pattern, dict) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= MAX_ALPHA
            for k, v in self.alpha_pattern.items())), "alpha_pattern",
            f"a dict of site pattern -> positive number up to {MAX_ALPHA:g}")

    def rank_for(self, site: str) -> int:
        """``r``, or the value of the first ``rank_pattern`` key matching ``site``
        (patterns as in ``targets``: exact name, dotted suffix or ``re:``)."""
        return pattern_value(self.rank_pattern, site, self.r)

    def alpha_for(self, site: str) -> float:
        return float(pattern_value(self.alpha_pattern, site, self.alpha))

    def scaling_for(self, site: str) -> float:
        r = self.rank_for(site)
        return self.alpha_for(site) / (math.sqrt(r) if self.use_rslora else r)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)



class LoraPart(nn.Module):
    def __init__(self, base: nn.Module, config: LoraConfig, site: str):
        super().__init__()
        self.is_embedding = isinstance(base, nn.Embedding)
        self.is_conv1d = not self.is_embedding and not isinstance(base, nn.Linear)
        if self.is_embedding:
            in_f, out_f = base.num_embeddings, base.embedding_dim
        else:
            in_f, out_f = linear_dims(base)
        r = config.rank_for(site)
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(r, in_f, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=dev, dtype=dt))
        self.scaling = config.scaling_for(site)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.pissa = config.init == "pissa"
        with torch.no_grad():
            if self.pissa:
                if self.is_embedding:
                    raise ConfigError(f"lora init 'pissa' needs a Linear layer; site {site!r} is an Embedding")
                if r > min(in_f, out_f):
                    raise ConfigError(f"lora init 'pissa': r={r} exceeds the rank of the weight at site {site!r} "
                                      f"({out_f}x{in_f}); use r <= {min(in_f, out_f)}")
                A0, B0 = _pissa_factors(self._weight_out_in(base), r, self.scaling)
                self.lora_A.copy_(A0)
                self.lora_B.copy_(B0)
                self.register_buffer("lora_A0", A0.clone())
                self.register_buffer("lora_B0", B0.clone())
            elif not random_init_wanted():
                pass  # a file's tensors fill both factors next (zeros until then)
            elif self.is_embedding:
                nn.init.normal_(self.lora_B)
            elif config.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.use_dora = config.use_dora
        if self.use_dora:
            if self.is_embedding:
                raise ConfigError(f"lora use_dora=True needs a Linear or Conv1D layer; site {site!r} is an Embedding")
            object.__setattr__(self, "_base", base)  # read, never owned: not a submodule
            object.__setattr__(self, "_norm", (None, None))  # (versions key, cached norm)
            object.__setattr__(self, "_merged_factor", None)
            with torch.no_grad():
                self.lora_magnitude = nn.Parameter(self._weight_norm().clone())

    def _weight_out_in(self, base):
        w = base.weight
        return w.T if self.is_conv1d else w

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The update's contribution to the site output for input ``x``."""
        return self._unscaled_delta(x) * self.scaling

    def _unscaled_delta(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_embedding:
            return F.embedding(x, self.lora_A.T) @ self.lora_B.T
        out = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
        if self.pissa:
            out = out - F.linear(F.linear(x, self.lora_A0), self.lora_B0)
        return out

    def apply(self, inner, x):
        if self.use_dora:
            return self._apply_dora(inner, x)
        y = inner(x)
        d = self._unscaled_delta(x).to(y.dtype)
        if not torch.is_grad_enabled() and y.data_ptr() != x.data_ptr():
            return y.add_(d, alpha=self.scaling)  # inference: no output-sized temporary at all
        # One fused add-with-scale: no separate scaled temporary the size of the output.
        return torch.add(y, d, alpha=self.scaling)

    # -------------------------------------------------------- DoRA
    def _weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output channel, detached; cached while W, A, B and the
        scaling are unchanged (version counters), so inference computes it once."""
        base = self._base
        key = (id(base.weight), base.weight._version, self.lora_A._version, self.lora_B._version, self.scaling)
        cached_key, norm = self._norm
        if cached_key == key:
            return norm
        with torch.no_grad():
            w = self._weight_out_in(base)
            norm = torch.linalg.norm(w + self.scaling * (self.lora_B.to(w.dtype) @ self.lora_A.to(w.dtype)), dim=1)
        object.__setattr__(self, "_norm", (key, norm))
        return norm

    def dora_factor(self) -> torch.Tensor:
        """``m / ||W + s B A||`` per output channel (differentiable in ``m`` only)."""
        return self.lora_magnitude / self._weight_norm().to(self.lora_magnitude.dtype)

    def _apply_dora(self, inner, x):
        y = inner(x)
        factor = self.dora_factor().to(y.dtype)
        bias = self._base.bias
        if self.training and isinstance(self.dropout, nn.Dropout) and self.dropout.p > 0:
            xd = self.dropout(x)  # one mask for both terms, as PEFT
            base_out = F.linear(xd, self._weight_out_in(self._base))
        else:
            xd = x
            base_out = y if bias is None else y - bias
        lora = F.linear(F.linear(xd, self.lora_A), self.lora_B).to(y.dtype) * self.scaling
        return y + (factor - 1) * base_out + factor * lora

    def extra_bank_tensors(self) -> list[torch.Tensor]:
        """Tensors beyond the part's own that a cached bank depends on: DoRA's norms
        read the base weight."""
        return [self._base.weight] if self.use_dora else []

    # -------------------------------------------------------- mixed batches
    row_role = "delta_in"  # adds an update computed from the site input (see polyadapter.mixed)

    def bucket_key(self) -> tuple:
        """Parts with equal keys stack into one bank: same shapes, so different ranks
        get their own banks and no adapter is padded to another's rank."""
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return ("lora", tuple(self.lora_A.shape), self.lora_B.shape[0], self.is_embedding, self.pissa, p,
                self.lora_A.dtype, self.use_dora)

    @staticmethod
    def stack_bank(parts: list["LoraPart"]) -> dict:
        first = parts[0]
        bank = {
            "A": torch.stack([p.lora_A for p in parts]),
            # (slots, out, r), laid out as (slots, r, out): each slot's B.T is contiguous (see kernels.torch_ops)
            "B": torch.stack([p.lora_B.t() for p in parts]).transpose(1, 2),
            "scale": torch.tensor([p.scaling for p in parts], dtype=torch.float32, device=first.lora_A.device),
            "dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
            "embedding": first.is_embedding,
        }
        if first.pissa:
            bank["A0"] = torch.stack([p.lora_A0 for p in parts])
            bank["B0"] = torch.stack([p.lora_B0.t() for p in parts]).transpose(1, 2)
        if first.is_embedding:  # rows of A.T for every (slot, token id), one lookup table
            bank["A_rows"] = bank["A"].transpose(1, 2).reshape(-1, bank["A"].shape[1])
        if first.use_dora:  # every part at a site shares its base layer
            bank["factor"] = torch.stack([p.dora_factor() for p in parts])          # (slots, out)
            bank["W"] = first._weight_out_in(first._base)
            bank["bias"] = first._base.bias
        return bank

    @staticmethod
    def bank_forward(bank: dict, x, out, slots, in_place: bool, training: bool):
        """``out`` plus every row's own LoRA update (rows choose bank ``slots``)."""
        if (in_place and not training and not bank["embedding"] and "factor" not in bank and "A0" not in bank
                and out.is_contiguous() and lora_add_(x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]),
                                                      bank["A"], bank["B"], slots, bank["scale"], bank)):
            return out  # the serving engine's decode steps: straight to the in-place kernels
        n = x.shape[0]
        out3 = out.reshape(n, -1, out.shape[-1])
        if bank["embedding"]:
            vocab = bank["A"].shape[2]
            h = F.embedding(x.reshape(n, -1) + (slots * vocab)[:, None], bank["A_rows"])     # (n, L, r)
            h = h * bank["scale"].index_select(0, slots).to(h.dtype)[:, None, None]
            delta = torch.bmm(h, bank["B"].index_select(0, slots).transpose(1, 2)).to(out.dtype)
            return out + delta.view(out.shape)
        x3 = x.reshape(n, -1, x.shape[-1])
        xd = F.dropout(x3, bank["dropout"], training=True) if training and bank["dropout"] > 0 else x3
        if "factor" in bank:
            return LoraPart._bank_dora(bank, x3, xd, out, slots)
        if in_place and out3.data_ptr() == out.data_ptr():
            res = lora_delta(xd, bank["A"], bank["B"], slots, bank["scale"], out=out3, cache=bank)
            if "A0" in bank:
                res = lora_delta(x3, bank["A0"], bank["B0"], slots, -bank["scale"], out=res)
            return res.view(out.shape)
        delta = lora_delta(xd, bank["A"], bank["B"], slots, bank["scale"])
        if "A0" in bank:
            delta = delta - lora_delta(x3, bank["A0"], bank["B0"], slots, bank["scale"])
        return out + delta.view(out.shape).to(out.dtype)

    @staticmethod
    def _bank_dora(bank: dict, x3, xd, out, slots):
        """DoRA rows: ``y + (f - 1) * base_out + f * s B A x`` with each row's factor ``f``."""
        n = x3.shape[0]
        out3 = out.reshape(n, -1, out.shape[-1])
        if xd is x3:
            base_out = out3 if bank["bias"] is None else out3 - bank["bias"].to(out.dtype)
        else:
            base_out = F.linear(xd, bank["W"]).to(out.dtype)
        f = bank["factor"].index_select(0, slots).to(out.dtype)[:, None, :]            # (n, 1, out)
        delta = lora_delta(xd, bank["A"], bank["B"], slots, bank["scale"]).to(out.dtype)
        return (out3 + (f - 1) * base_out + f * delta).view(out.shape)

    # -------------------------------------------------------- weight space
    def delta_weight(self) -> torch.Tensor:
        """The update in the base weight's own layout."""
        w = self.lora_B @ self.lora_A
        if self.pissa:
            w = w - self.lora_B0 @ self.lora_A0
        w = w * self.scaling
        return w.T if (self.is_conv1d or self.is_embedding) else w

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        if self.use_dora:  # W' = f * (W + s B A) per output channel; f kept to unmerge
            factor = self.dora_factor().detach().clone()
            object.__setattr__(self, "_merged_factor", factor)
            merged = (base.weight + self.delta_weight().to(base.weight.dtype)) * self._channel(factor, base)
            base.weight.copy_(merged)
            return
        base.weight.add_(self.delta_weight().to(base.weight.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        if self.use_dora:
            factor = self._merged_factor
            base.weight.copy_(base.weight / self._channel(factor, base) - self.delta_weight().to(base.weight.dtype))
            object.__setattr__(self, "_merged_factor", None)
            return
        base.weight.sub_(self.delta_weight().to(base.weight.dtype))

    def _channel(self, factor: torch.Tensor, base: nn.Module) -> torch.Tensor:
        """``factor`` shaped to scale the base weight's output channels (rows of a
        Linear's weight, columns of a Conv1D's)."""
        factor = factor.to(base.weight.dtype)
        return factor[None, :] if self.is_conv1d else factor[:, None]


def _pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A0 (r, in), B0 (out, r) with ``scaling * B0 @ A0`` the weight's best rank-r part."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    root = torch.sqrt(S[:r] / scaling)
    A0 = root[:, None] * Vh[:r]
    B0 = U[:, :r] * root[None, :]
    return A0.to(weight.dtype), B0.to(weight.dtype)


def _accepts(module: nn.Module) -> bool:
    return isinstance(module, LINEAR_TYPES + (nn.Embedding,))


def _size(module: nn.Module, config: LoraConfig, site: str) -> int:
    if isinstance(module, nn.Embedding):
        dims = module.num_embeddings + module.embedding_dim
    else:
        dims = sum(linear_dims(module))
    out = module.embedding_dim if isinstance(module, nn.Embedding) else linear_dims(module)[1]
    return config.rank_for(site) * dims * (2 if config.init == "pissa" else 1) + out  # PiSSA keeps A0, B0 too


SPEC = MethodSpec(
    name="lora",
    config_cls=LoraConfig,
    make_part=LoraPart,
    fill_defaults=lambda model, cfg: with_preset_targets(model, cfg, "lora"),
    accepts=_accepts,
    summary="low-rank update B@A beside Linear / Conv1D / Embedding layers",
    size=_size,
)
