"""(IA)^3: learned vectors that rescale a Linear layer's output (keys, values) or, for
feed-forward layers, its input — initialised to ones, so the model starts at the base.
Parameter layout matches PEFT: ``ia3_l`` is (out, 1), or (1, in) for feed-forward sites.

Two conventions for the feed-forward vector, both offered (``placement``):
``"peft"`` (the default; PEFT's and the paper's code): the *input* of the FFN's second
projection is scaled (after the activation); ``"adapterhub"`` (AdapterHub's
``IA3Config``): the *output* of the FFN's first projection is scaled (before the
activation) — ``presets.py`` key ``ia3_adapterhub``. They differ unless the activation
commutes with scaling (ReLU with positive scales does; GELU does not)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..presets import preset
from ..sites import LINEAR_TYPES, linear_dims, matches_any
from .spec import MethodSpec, with_preset_targets


@dataclass
class IA3Config(AdapterConfig):
    """``feedforward``: patterns of target sites whose *input* is scaled; ``None`` takes
    the family preset when ``targets`` is also unset, else no site is feed-forward.
    ``placement`` picks the preset when ``targets`` is None: ``"peft"`` (FFN second
    projection's input) or ``"adapterhub"`` (FFN first projection's output; no
    feed-forward sites)."""

    method: ClassVar[str] = "ia3"
    pattern_fields: ClassVar[tuple[str, ...]] = ("targets", "modules_to_save", "feedforward")
    feedforward: list[str] | None = None
    placement: str = "peft"

    def validate(self):
        self.require(self.placement in ("peft", "adapterhub"), "placement", "'peft' or 'adapterhub'")
        if isinstance(self.feedforward, str):
            self.feedforward = [self.feedforward]
        if self.feedforward is not None:
            self.feedforward = list(self.feedforward)
            self.require(all(isinstance(p, str) and p for p in self.feedforward), "feedforward",
                         "a list of non-empty strings")


class IA3Part(nn.Module):
    def __init__(self, base: nn.Module, config: IA3Config, site: str):
        super().__init__()
        in_f, out_f = linear_dims(base)
        self.is_feedforward = matches_any(site, config.feedforward or [])
        self.is_conv1d = not isinstance(base, nn.Linear)
        shape = (1, in_f) if self.is_feedforward else (out_f, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype))

    def apply(self, inner, x):
        scale = self.ia3_l.flatten()
        if self.is_feedforward:
            return inner(x * scale.to(x.dtype))
        y = inner(x)
        return y * scale.to(y.dtype)

    # mixed batches (see polyadapter.mixed): a per-row scale on the input or output
    @property
    def row_role(self) -> str:
        return "in_scale" if self.is_feedforward else "out_scale"

    def bucket_key(self) -> tuple:
        return ("ia3", self.is_feedforward, self.ia3_l.numel(), self.ia3_l.dtype)

    @staticmethod
    def stack_bank(parts: list[IA3Part]) -> dict:
        return {"scale": torch.stack([p.ia3_l.flatten() for p in parts])}

    def _weight_scale(self) -> torch.Tensor:
        # ia3_l broadcast over the weight in its stored layout: (out, in), or (in, out) for Conv1D.
        return self.ia3_l.T if self.is_conv1d else self.ia3_l

    @torch.no_grad()
    def merge(self, base: nn.Module) -> None:
        base.weight.mul_(self._weight_scale().to(base.weight.dtype))
        if not self.is_feedforward and base.bias is not None:
            base.bias.mul_(self.ia3_l.flatten().to(base.bias.dtype))

    @torch.no_grad()
    def unmerge(self, base: nn.Module) -> None:
        scale = self._weight_scale()
        base.weight.div_(_nonzero(scale).to(base.weight.dtype))
        if not self.is_feedforward and base.bias is not None:
            base.bias.div_(_nonzero(self.ia3_l.flatten()).to(base.bias.dtype))


def _nonzero(t: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return torch.where(t.abs() < eps, torch.full_like(t, eps), t)


def _fill_defaults(model: nn.Module, config: IA3Config) -> IA3Config:
    if config.placement == "adapterhub":
        if config.targets is None and config.feedforward is None:
            config = config.replace(feedforward=[])
        return with_preset_targets(model, config, "ia3_adapterhub")
    if config.targets is None and config.feedforward is None:
        config = config.replace(feedforward=list(preset(model, "ia3_feedforward") or []))
    return with_preset_targets(model, config, "ia3")


SPEC = MethodSpec(
    name="ia3",
    config_cls=IA3Config,
    make_part=IA3Part,
    fill_defaults=_fill_defaults,
    accepts=lambda m: isinstance(m, LINEAR_TYPES),
    summary="learned rescaling vectors on Linear outputs (or inputs, feed-forward)",
)
