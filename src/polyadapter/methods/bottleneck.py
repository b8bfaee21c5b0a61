"""Bottleneck adapters: a small down-project / non-linearity / up-project network at a
site, either after it (*sequential*: Houlsby et al. 2019, Pfeiffer et al. 2020) or
beside it (*parallel*: He et al. 2022, "Towards a Unified View of PETL").

- sequential: ``y = site(x)``; output ``y + s * up(act(down(y)))`` (or without the
  ``y +`` when ``residual=False``). The adapter reads the site's *output*, so both
  projections live in the output width.
- parallel: output ``site(x) + s * up(act(down(x)))``. The adapter reads the site's
  *input*, so ``down`` takes the input width and ``up`` gives the output width; this
  is what lets a parallel adapter sit beside a whole sub-layer (Llama's ``mlp``).

``up`` starts at zero (weight and bias), so with the residual the model starts exactly
at the base and training departs from it smoothly — the property the papers rely on
and the tests check bit for bit. ``down`` keeps ``nn.Linear``'s default (Kaiming
uniform) init: with ``up`` zero the output is unaffected, and a non-degenerate
``down`` is what gives ``up`` non-zero gradients from the first step.

Bottleneck adapters are non-linear, so they have no weight-space form: parts define
no ``merge``, and ``AdapterModel.merge_adapter`` refuses them with a StateError.

Placement is data (``presets.py``): ``houlsby`` adapts the attention output and the
feed-forward output of each layer, ``pfeiffer`` only the feed-forward output, and
``parallel`` names the site a parallel adapter sits beside.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import TargetError
from ..kernels import gathered_linear
from ..sites import LINEAR_TYPES, module_dims
from .spec import MethodSpec, with_preset_targets

MODES = ("sequential", "parallel")
PLACEMENTS = ("houlsby", "pfeiffer")
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,  # the same function under its other common name
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class BottleneckConfig(AdapterConfig):
    """``mode``: ``sequential`` (adapter after the site) or ``parallel`` (beside it).

    ``placement`` only chooses the preset when ``targets`` is None in sequential mode
    (``houlsby``: attention and feed-forward outputs; ``pfeiffer``: feed-forward
    output only); parallel mode always takes the ``parallel`` preset.

    Bottleneck width: ``hidden_size`` when given, else
    ``max(1, round(width / reduction_factor))`` with ``width`` the adapter's input
    width at that site — so one config fits sites of different widths.

    ``residual=False`` (sequential only) makes the output ``s * f(y)`` instead of
    ``y + s * f(y)``. With ``up`` zero-initialised that output is zero at first: the
    model does **not** start at the base. It exists for adapters trained to replace a
    sub-layer's output, not refine it; parallel mode always adds to the site output
    and refuses ``residual=False`` rather than ignore it.

    ``scale`` multiplies the adapter's contribution (He et al. use 4 for parallel
    adapters); ``learned_scale=True`` makes it a trainable scalar per site initialised
    to ``scale``. ``dropout`` acts on the adapter's input only, never on the base path.
    """

    method: ClassVar[str] = "bottleneck"
    mode: str = "sequential"
    placement: str = "pfeiffer"
    reduction_factor: float = 16.0
    hidden_size: int | None = None
    activation: str = "relu"
    residual: bool = True
    scale: float = 1.0
    learned_scale: bool = False
    dropout: float = 0.0

    def validate(self):
        self.require(self.mode in MODES, "mode", f"one of {list(MODES)}")
        self.require(self.placement in PLACEMENTS, "placement", f"one of {list(PLACEMENTS)}")
        self.require(_is_number(self.reduction_factor) and self.reduction_factor > 0,
                     "reduction_factor", "a positive number")
        self.require(self.hidden_size is None or (isinstance(self.hidden_size, int)
                                                  and not isinstance(self.hidden_size, bool)
                                                  and self.hidden_size > 0),
                     "hidden_size", "a positive integer or null")
        self.require(self.activation in ACTIVATIONS, "activation", f"one of {sorted(ACTIVATIONS)}")
        self.require(isinstance(self.residual, bool), "residual", "true or false")
        self.require(self.residual or self.mode == "sequential", "residual",
                     "true in parallel mode (a parallel adapter always adds to the site output)")
        self.require(_is_number(self.scale) and abs(self.scale) <= 1e6, "scale",
                     "a finite number from -1e6 to 1e6 (larger ones overflow the outputs)")
        self.require(isinstance(self.learned_scale, bool), "learned_scale", "true or false")
        self.require(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)")

    def bottleneck_width(self, width: int) -> int:
        if self.hidden_size is not None:
            return self.hidden_size
        return max(1, round(width / self.reduction_factor))


class BottleneckPart(nn.Module):
    """One adapter's bottleneck network at one site."""

    def __init__(self, base: nn.Module, config: BottleneckConfig, site: str):
        super().__init__()
        in_w, out_w = module_dims(base)
        self.site = site
        self.parallel = config.mode == "parallel"
        self.residual = config.residual
        # Sequential adapters read the site output; parallel ones read the site input.
        self.in_width = in_w if self.parallel else out_w
        self.out_width = out_w
        hidden = config.bottleneck_width(self.in_width)
        ref = next(base.parameters())  # build on the base's device and dtype
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.down = nn.Linear(self.in_width, hidden, **kw)
        self.act = ACTIVATIONS[config.activation]()
        self.up = nn.Linear(hidden, out_w, **kw)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        if config.learned_scale:
            self.scale = nn.Parameter(torch.tensor(float(config.scale), **kw))
        else:
            self.scale = float(config.scale)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution for adapter input ``h``."""
        if h.shape[-1] != self.in_width:
            # Sub-layer widths are inferred from their first and last Linear; say so
            # plainly when that guess does not match what actually flows through.
            raise TargetError(
                f"bottleneck adapter at site {self.site!r}: expected the adapter input's last dimension "
                f"to be {self.in_width} (inferred from the module's Linear layers), found shape "
                f"{tuple(h.shape)}; target a Linear layer or a sub-layer whose input/output is that width")
        out = self.up(self.act(self.down(self.dropout(h.to(self.down.weight.dtype)))))
        return out * self.scale

    def apply(self, inner, x):
        y = inner(x)
        first, rest = _split(y, self.site)
        if self.parallel:
            new = first + self.delta(x).to(first.dtype)
        elif self.residual:
            new = first + self.delta(first).to(first.dtype)
        else:
            new = self.delta(first).to(first.dtype)
        return new if rest is None else (new,) + rest


    # -------------------------------------------------------- mixed batches
    @property
    def row_role(self) -> str:
        """Parallel adapters read the site input, sequential ones its output."""
        return "delta_in" if self.parallel else "delta_out"

    def bucket_key(self) -> tuple:
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return ("bottleneck", self.parallel, self.residual, type(self.act).__name__, self.in_width,
                self.down.out_features, self.out_width, p, self.down.weight.dtype)

    @staticmethod
    def stack_bank(parts: list["BottleneckPart"]) -> dict:
        first = parts[0]
        w = first.down.weight
        return {
            "down": torch.stack([p.down.weight for p in parts]), "down_bias": torch.stack([p.down.bias for p in parts]),
            "up": torch.stack([p.up.weight for p in parts]), "up_bias": torch.stack([p.up.bias for p in parts]),
            "scale": torch.stack([torch.as_tensor(p.scale, dtype=w.dtype, device=w.device) for p in parts]),
            "act": first.act, "residual": first.residual, "site": first.site,
            "dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        }

    @staticmethod
    def bank_forward(bank: dict, h, out, slots, in_place: bool, training: bool):
        """``out`` plus (or, without residual, replaced by) every row's own adapter
        output for adapter input ``h`` (rows choose bank ``slots``)."""
        n, width = h.shape[0], bank["down"].shape[2]
        if h.shape[-1] != width:
            raise TargetError(f"bottleneck adapter at site {bank['site']!r}: expected the adapter input's last "
                              f"dimension to be {width}, found shape {tuple(h.shape)}")
        h3 = h.reshape(n, -1, width).to(bank["down"].dtype)
        if training and bank["dropout"] > 0:
            h3 = torch.nn.functional.dropout(h3, bank["dropout"], training=True)
        mid = bank["act"](gathered_linear(h3, bank["down"], slots, bias=bank["down_bias"]))
        delta = gathered_linear(mid, bank["up"], slots, bias=bank["up_bias"], scale=bank["scale"])
        delta = delta.view(out.shape).to(out.dtype)
        if not bank["residual"]:
            return delta
        return out.add_(delta) if in_place else out + delta


def _split(y, site: str):
    """(tensor to adapt, the rest of a tuple output or None)."""
    if isinstance(y, torch.Tensor):
        return y, None
    if isinstance(y, tuple) and y and isinstance(y[0], torch.Tensor):
        return y[0], tuple(y[1:])
    raise TargetError(f"bottleneck adapter at site {site!r}: the site returns {type(y).__name__}; "
                      f"expected a tensor or a tuple starting with one")


def _accepts(module: nn.Module) -> bool:
    # A Linear-like layer, or a sub-layer built from them. Modules holding an embedding
    # are whole models or stems whose "input width" is a vocabulary, not a hidden size.
    if isinstance(module, LINEAR_TYPES):
        return True
    if any(isinstance(m, nn.Embedding) for m in module.modules()):
        return False
    try:  # raises when the module holds no Linear layer to tell its widths
        module_dims(module)
    except TargetError:
        return False
    return True


def _fill_defaults(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    key = "parallel" if config.mode == "parallel" else config.placement
    return with_preset_targets(model, config, key)


def _size(module: nn.Module, config: BottleneckConfig, site: str) -> int:
    in_w, out_w = module_dims(module)
    read = in_w if config.mode == "parallel" else out_w
    hidden = config.bottleneck_width(read)
    return hidden * (read + out_w + 1) + out_w


SPEC = MethodSpec(
    name="bottleneck",
    config_cls=BottleneckConfig,
    make_part=BottleneckPart,
    fill_defaults=_fill_defaults,
    accepts=_accepts,
    summary="bottleneck adapter (down, non-linearity, up) after or beside a layer or sub-layer",
    size=_size,
)
