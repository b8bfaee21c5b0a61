"""AdapterFusion (Pfeiffer et al., "AdapterFusion: Non-Destructive Task Composition for
Transfer Learning"): a learned attention, at every site, over what several trained
adapters would each output there.

A fusion adapter is an ordinary adapter whose config names the adapters it fuses
(``FusionConfig(adapters=["a", "b", "c"])``); it gets one part at every site where
any of them acts, so it trains, saves, loads and shows in ``info`` like any other.
Activate it with ``set_active("f")`` or ``Fuse("a", "b", "c")``; train it with
``train_adapter("f")``, which leaves the fused adapters frozen.

At a site with output ``y`` (the base, or whatever sits beneath) and the fused
adapters' outputs ``o_1..o_k`` on the same input, the part computes

    score_j = <Q y, K o_j> / (sqrt(width) * temperature)
    out     = y + sum_j softmax(score)_j * V (o_j - y)

per token. ``V`` starts as the identity and ``Q``, ``K`` near zero, so an untrained
fusion is close to the plain average of the adapters — a sensible place to start —
while the small random ``Q``/``K`` give the attention gradients from the first step.

``style="adapterhub"`` computes what AdapterHub's ``adapters`` (1.3, its "dynamic"
fusion) computes: keys and values are the adapters' *contributions* ``d_j = o_j - y``
(their scaled up-projections), not their outputs; the scores are not divided by
``sqrt(width)``; ``V`` has no bias:

    score_j = <Q y, K d_j> / temperature
    out     = y + sum_j softmax(score)_j * V d_j

At a LayerNorm site (``seq_bn`` adapters on a post-LN block) ``y = LN(z)`` and the
adapters' outputs carry ``(z, d_j)`` (see ``mixed.PRE_NORM``); there the result is
``LN(z + sum_j p_j V d_j)``, the same as AdapterHub's (query ``LN(z)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..compose import first_tensor
from ..config import MIN_TEMPERATURE, AdapterConfig
from ..errors import ConfigError
from ..mixed import PRE_NORM
from ..sites import module_dims, sites_of
from .spec import MethodSpec

STYLES = ("polyadapter", "adapterhub")


@dataclass
class FusionConfig(AdapterConfig):
    """``adapters``: the names of the fused adapters, in order. ``temperature``
    divides the attention scores. ``targets`` is filled in with the sites where any
    fused adapter acts (and saved, so loading needs no other adapter present).
    ``style``: ``polyadapter`` (ours, above) or ``adapterhub`` (AdapterHub's dynamic
    fusion; see the module docstring)."""

    method: ClassVar[str] = "fusion"
    adapters: list[str] | None = None
    temperature: float = 1.0
    style: str = "polyadapter"

    def validate(self):
        if isinstance(self.adapters, tuple):
            self.adapters = list(self.adapters)
        self.require(isinstance(self.adapters, list) and len(self.adapters) >= 2
                     and all(isinstance(a, str) and a for a in self.adapters)
                     and len(set(self.adapters)) == len(self.adapters),
                     "adapters", "a list of at least two distinct adapter names")
        self.require(isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
                     and self.temperature >= MIN_TEMPERATURE, "temperature",
                     f"a number of at least {MIN_TEMPERATURE:g} (smaller ones turn the scores into inf "
                     f"and the outputs into NaN)")
        self.require(not self.modules_to_save, "modules_to_save", "empty (a fusion layer saves no module copies)")
        self.require(self.style in STYLES, "style", f"one of {list(STYLES)}")


class FusionPart(nn.Module):
    def __init__(self, base: nn.Module, config: FusionConfig, site: str):
        super().__init__()
        if isinstance(base, nn.Embedding):
            width = base.embedding_dim
        elif isinstance(base, nn.LayerNorm):
            width = int(base.normalized_shape[-1])
            object.__setattr__(self, "_norm", base)  # the site's LayerNorm (seq_bn sites): called, not saved
        else:
            width = module_dims(base)[1]
        ref = next(base.parameters())
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.adapterhub = config.style == "adapterhub"
        self.query = nn.Linear(width, width, **kw)
        self.key = nn.Linear(width, width, **kw)
        self.value = nn.Linear(width, width, bias=not self.adapterhub, **kw)
        with torch.no_grad():
            for lin in (self.query, self.key):
                nn.init.normal_(lin.weight, std=0.02)
                lin.bias.zero_()
            self.value.weight.copy_(torch.eye(width, **kw))
            if self.value.bias is not None:
                self.value.bias.zero_()
        self.temperature = float(config.temperature)
        self.width = width

    def fuse(self, y, outs: list):
        """The fused site output from the output beneath ``y`` and the adapters' ``outs``."""
        if self.adapterhub:
            return self._fuse_adapterhub(y, outs)
        base, rest = first_tensor(y)
        firsts = torch.stack([first_tensor(o)[0] for o in outs], dim=-2)             # (..., k, width)
        dt = self.query.weight.dtype
        q = self.query(base.to(dt)).unsqueeze(-2)                                     # (..., 1, width)
        scores = (q * self.key(firsts.to(dt))).sum(-1) / (math.sqrt(self.width) * self.temperature)
        probs = torch.softmax(scores.float(), dim=-1).to(dt)                          # (..., k)
        fused = (probs.unsqueeze(-1) * self.value((firsts - base.unsqueeze(-2)).to(dt))).sum(-2)
        new = base + fused.to(base.dtype)
        return new if rest is None else (new,) + rest

    def _fuse_adapterhub(self, y, outs: list):
        base, rest = first_tensor(y)
        firsts = [first_tensor(o)[0] for o in outs]
        marks = [getattr(o, PRE_NORM, None) for o in firsts]
        norm = getattr(self, "_norm", None)
        if norm is not None and all(m is not None for m in marks):
            z = marks[0][0]
            deltas = torch.stack([m[1] for m in marks], dim=-2)                       # (..., k, width)
        else:
            z = None
            deltas = torch.stack(firsts, dim=-2) - base.unsqueeze(-2)
        dt = self.query.weight.dtype
        q = self.query(base.to(dt)).unsqueeze(-2)
        scores = (q * self.key(deltas.to(dt))).sum(-1) / self.temperature
        probs = torch.softmax(scores.float(), dim=-1).to(dt)
        fused = (probs.unsqueeze(-1) * self.value(deltas.to(dt))).sum(-2).to(base.dtype)
        if z is None:
            new = base + fused
        else:
            new = norm(z + fused)
            setattr(new, PRE_NORM, (z, fused))
        return new if rest is None else (new,) + rest


def _fill_defaults(model: nn.Module, config: FusionConfig) -> FusionConfig:
    if config.targets is not None:
        return config
    sites = [name for name, site in sites_of(model).items() if any(a in site.adapters for a in config.adapters)]
    if not sites:
        raise ConfigError(f"fusion config: none of the adapters {config.adapters} acts anywhere in this model; "
                          f"add them before the fusion adapter")
    return config.replace(targets=sites)


SPEC = MethodSpec(
    name="fusion",
    config_cls=FusionConfig,
    make_part=FusionPart,
    fill_defaults=_fill_defaults,
    accepts=lambda m: True,
    summary="AdapterFusion: learned attention over several adapters' outputs (use with Fuse)",
)
