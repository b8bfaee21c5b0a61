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

AdapterHub's bottleneck configs (the ``adapters`` library) are placements too:

- ``double_seq_bn`` (``DoubleSeqBnConfig``, Houlsby): the ``houlsby`` sites, the same
  computation ``LN(h + f(h) + x)`` (``h`` a sub-layer's output, ``x`` its residual input).
- ``seq_bn`` (``SeqBnConfig``, Pfeiffer, ``original_ln_before=True``): the adapter reads
  the block's *normalised* sum and is added before the block's LayerNorm again,
  ``LN(z + f(LN z))`` with ``z = h + x``. On post-LN models (BERT) the site is the
  block's LayerNorm itself: its input is ``z``, and the part calls that LayerNorm (the
  site's own module) a second time. On pre-LN models (Llama, GPT-2, ViT) the block has
  no LayerNorm after the sum, so ``LN`` is the identity and the site is the layer whose
  output is ``z``: ``z + f(z)``, the plain sequential rule.
  Adapters stacked at a LayerNorm site chain on the *pre-norm* sum (AdapterHub's
  semantics): each output carries ``(z_in, delta)`` as a tensor attribute
  (``mixed.PRE_NORM``), which the next adapter of a Stack, a fusion layer and mixed
  batches read.
- ``par_bn`` (``ParBnConfig``, He et al.): ``LN(h + x + s f(x))``, reading the block's
  *residual input* ``x``. The site is the whole output block (BERT's ``BertOutput``,
  called as ``(hidden_states, input_tensor)``); the part calls the block's own
  projection, dropout and LayerNorm, named as data in ``presets.BLOCKS``. It replaces
  the block's call, so in a ``Stack`` an adapter beneath it at the same block is not
  seen (AdapterHub's Stack of parallel adapters keeps only the last one too), and in
  mixed batches it runs once per distinct adapter on its rows. Pre-LN decoders have no
  module whose call holds that residual input (it is a local of the layer's forward),
  so ``par_bn`` is refused there rather than approximated.

AdapterHub field names map to ours: ``scaling`` -> ``scale``, ``non_linearity`` ->
``activation``, ``reduction_factor`` (the same), ``ln_before``/``ln_after``/
``adapter_residual_before_ln`` (the same: an adapter-owned LayerNorm on the adapter's
input / output), ``leave_out`` (the same: layer indices left without the adapter);
``original_ln_before`` is the choice between ``houlsby``-like and ``seq_bn`` sites, and
``original_ln_after=False`` or ``residual_before_ln=False`` with ``original_ln_before``
(which drop or double the block's residual) are refused by the AdapterHub reader.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..errors import ConfigError, TargetError
from ..kernels import gathered_linear
from ..mixed import PRE_NORM, carried_pre_norm
from ..presets import block_layout, layer_index, model_family
from ..sites import LINEAR_TYPES, module_dims, resolve_targets
from .spec import MethodSpec, with_preset_targets

MODES = ("sequential", "parallel")
PLACEMENTS = ("houlsby", "pfeiffer", "seq_bn", "double_seq_bn", "par_bn")
NORM_TYPES: tuple[type, ...] = (nn.LayerNorm,)
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

    AdapterHub's placements (see the module docstring): ``seq_bn`` (its Pfeiffer),
    ``double_seq_bn`` (its Houlsby, the same sites as ``houlsby``) and ``par_bn``
    (parallel beside the FFN block, reading its residual input; BERT-style models
    only; AdapterHub's ``ParBnConfig`` defaults are ``scale=4``, ``reduction_factor=2``
    — pass them, our defaults stay per field). ``placement`` chooses the preset only when ``targets`` is None; the kind of
    module a site is decides the computation (a LayerNorm site: ``LN(z + f(LN z))``;
    an output block named in ``presets.BLOCKS`` with ``par_bn``: the parallel rule).
    ``ln_before``/``ln_after``: a LayerNorm of the adapter's own on its input / on its
    output; with ``ln_after``, ``adapter_residual_before_ln`` puts the residual inside
    it (``LN_a(y + f)``) instead of after it (``LN_a(f) + y``). ``leave_out``: layer
    indices (counted from 0, as the layer container numbers them) that get no site.
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
    ln_before: bool = False
    ln_after: bool = False
    adapter_residual_before_ln: bool = False
    leave_out: list[int] = field(default_factory=list)

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
        for key in ("ln_before", "ln_after", "adapter_residual_before_ln"):
            self.require(isinstance(getattr(self, key), bool), key, "true or false")
        self.require(not self.ln_after or self.residual, "ln_after", "false when residual=false")
        self.leave_out = list(self.leave_out)
        self.require(all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.leave_out),
                     "leave_out", "a list of non-negative layer indices")
        self.require(self.placement != "par_bn" or self.mode == "sequential", "placement",
                     "not 'par_bn' with mode='parallel' (par_bn is its own parallel rule; leave mode at its "
                     "default)")

    def bottleneck_width(self, width: int) -> int:
        if self.hidden_size is not None:
            return self.hidden_size
        return max(1, round(width / self.reduction_factor))


class BottleneckPart(nn.Module):
    """One adapter's bottleneck network at one site.

    ``kind`` says how it acts, from the config and the kind of module the site is:
    ``sequential`` (after a sub-layer), ``parallel`` (beside it, reading its input),
    ``norm`` (a block's LayerNorm: AdapterHub's ``seq_bn``), ``block`` (an output block
    named in ``presets.BLOCKS``, with ``placement="par_bn"``)."""

    replaces_base = False

    def __init__(self, base: nn.Module, config: BottleneckConfig, site: str):
        super().__init__()
        self.site = site
        layout = block_layout(base) if config.placement == "par_bn" else None
        if config.placement == "par_bn" and layout is None:
            raise TargetError(f"bottleneck adapter at site {site!r}: placement='par_bn' needs an output block "
                              f"listed in presets.BLOCKS (e.g. BERT's layer.N.output, holding dense, dropout "
                              f"and LayerNorm); {type(base).__name__} is not one")
        if layout is not None:
            self.kind = "block"
            self.replaces_base = True  # the part calls the block's children itself, with the residual input
            in_w = out_w = module_dims(getattr(base, layout["projection"]))[1]
            object.__setattr__(self, "_block", base)
            object.__setattr__(self, "_layout", layout)
        elif isinstance(base, NORM_TYPES):
            self.kind = "norm"
            if config.mode == "parallel":
                raise TargetError(f"bottleneck adapter at site {site!r}: a LayerNorm site takes sequential "
                                  f"(seq_bn) adapters only; found mode='parallel'")
            in_w = out_w = int(base.normalized_shape[-1])
            object.__setattr__(self, "_norm", base)  # the site's own LayerNorm: called, never copied or saved
        else:
            self.kind = "parallel" if config.mode == "parallel" else "sequential"
            in_w, out_w = module_dims(base)
        self.parallel = self.kind in ("parallel", "block")
        self.residual = config.residual
        # Sequential adapters read the site output; parallel ones read the site input.
        self.in_width = in_w if self.kind == "parallel" else out_w
        self.out_width = out_w
        hidden = config.bottleneck_width(self.in_width)
        ref = next(base.parameters())  # build on the base's device and dtype
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.ln_before = nn.LayerNorm(self.in_width, **kw) if config.ln_before else None
        self.down = nn.Linear(self.in_width, hidden, **kw)
        self.act = ACTIVATIONS[config.activation]()
        self.up = nn.Linear(hidden, out_w, **kw)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()
        self.ln_after = nn.LayerNorm(out_w, **kw) if config.ln_after else None
        if self.ln_after is not None and self.kind == "norm":
            raise TargetError(f"bottleneck adapter at site {site!r}: ln_after at a LayerNorm (seq_bn) site would "
                              f"need the sub-layer output before the residual sum, which a LayerNorm site does "
                              f"not see; use ln_after with houlsby/double_seq_bn sites")
        self.residual_inside_ln = config.adapter_residual_before_ln
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
        h = self.dropout(h.to(self.down.weight.dtype))
        if self.ln_before is not None:
            h = self.ln_before(h)
        out = self.up(self.act(self.down(h)))
        return out * self.scale

    def _residual(self, y: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """``y + d``, or with the adapter's own output LayerNorm around ``d`` or ``y + d``."""
        if self.ln_after is None:
            return y + d
        if self.residual_inside_ln:
            return self.ln_after(d + y).to(y.dtype)
        return self.ln_after(d).to(y.dtype) + y

    def apply(self, inner, x):
        y = inner(x)
        first, rest = _split(y, self.site)
        if self.kind == "norm":
            # first = LN(z) for the pre-norm sum z beneath: the site input, or what an
            # adapter beneath (a Stack) carried. AdapterHub: LN(h + f(LN(h + x)) + x).
            z = carried_pre_norm(first, x)
            d = self.delta(first).to(first.dtype)
            new = self._norm(z + d)
            setattr(new, PRE_NORM, (z, d))
        elif self.kind == "parallel":
            new = first + self.delta(x).to(first.dtype)
        elif self.residual:
            new = self._residual(first, self.delta(first).to(first.dtype))
        else:
            new = self.delta(first).to(first.dtype)
        return new if rest is None else (new,) + rest

    # ------------------------------------------------ par_bn at an output block
    @property
    def module(self):
        """For ``kind == "block"``: what runs instead of the block (``compose`` and
        ``mixed`` call it with the block's own arguments, as for a module copy)."""
        if self.kind != "block":
            raise AttributeError("module")
        return self._block_call

    def _block_call(self, hidden_states, *args, **kwargs):
        lay, block = self._layout, self._block
        if len(args) > lay["residual_arg"]:
            x = args[lay["residual_arg"]]
        elif lay["residual_kwarg"] in kwargs:
            x = kwargs[lay["residual_kwarg"]]
        else:
            raise TargetError(f"bottleneck adapter at site {self.site!r}: the block was called without its "
                              f"residual input {lay['residual_kwarg']!r}")
        h = getattr(block, lay["dropout"])(getattr(block, lay["projection"])(hidden_states))
        d = self.delta(x).to(h.dtype)
        if self.ln_after is not None:
            d = self.ln_after(d).to(h.dtype)
        # AdapterHub's order of the sums: (f(x) + h) + x, then the block's LayerNorm.
        return getattr(block, lay["norm"])(d + h + x)

    # -------------------------------------------------------- mixed batches
    @property
    def row_role(self) -> str | None:
        """Parallel adapters read the site input, sequential ones its output; LayerNorm
        sites and adapter-owned LayerNorms run per adapter on their rows (None)."""
        if self.kind in ("norm", "block") or self.ln_before is not None or self.ln_after is not None:
            return None
        return "delta_in" if self.parallel else "delta_out"

    def bucket_key(self) -> tuple:
        p = self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0
        return ("bottleneck", self.parallel, self.residual, type(self.act).__name__, self.in_width,
                self.down.out_features, self.out_width, p, self.down.weight.dtype)

    @staticmethod
    def stack_bank(parts: list[BottleneckPart]) -> dict:
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
    if isinstance(module, LINEAR_TYPES + NORM_TYPES):
        return True  # a LayerNorm site is AdapterHub's seq_bn on post-LN blocks
    if any(isinstance(m, nn.Embedding) for m in module.modules()):
        return False
    try:  # raises when the module holds no Linear layer to tell its widths
        module_dims(module)
    except TargetError:
        return False
    return True


def _fill_defaults(model: nn.Module, config: BottleneckConfig) -> BottleneckConfig:
    key = "parallel" if config.mode == "parallel" else config.placement
    if config.targets is None and config.placement == "par_bn" and not _has_preset(model, "par_bn"):
        raise ConfigError(
            f"bottleneck config: placement='par_bn' (AdapterHub's parallel adapter, reading the FFN block's "
            f"residual input) has no preset for model family {model_family(model)!r}: on pre-LN decoders that "
            f"residual is a local variable of the layer's forward, not the input of any module, so it cannot "
            f"be reached without copying the forward. Use mode='parallel' (beside the mlp, reading its "
            f"normalised input) or pass targets")
    config = with_preset_targets(model, config, key)
    if config.leave_out:
        # leave_out is AdapterHub's: layer indices without the adapter. Resolve the
        # patterns here and keep exact names, so the saved config says what was adapted.
        names = resolve_targets(model, config.targets, _accepts, "bottleneck config")
        keep = [n for n in names if layer_index(model, n) not in set(config.leave_out)]
        if not keep:
            raise ConfigError(f"bottleneck config: leave_out={config.leave_out} leaves no site of {config.targets}")
        config = config.replace(targets=keep, leave_out=[])
    return config


def _has_preset(model, key: str) -> bool:
    from ..presets import preset
    return preset(model, key) is not None


def _size(module: nn.Module, config: BottleneckConfig, site: str) -> int:
    if config.placement == "par_bn" and block_layout(module) is not None:
        in_w = out_w = module_dims(getattr(module, block_layout(module)["projection"]))[1]
    elif isinstance(module, NORM_TYPES):
        in_w = out_w = int(module.normalized_shape[-1])
    else:
        in_w, out_w = module_dims(module)
    read = in_w if config.mode == "parallel" else out_w
    hidden = config.bottleneck_width(read)
    return hidden * (read + out_w + 1) + out_w + 2 * (read * config.ln_before + out_w * config.ln_after)


SPEC = MethodSpec(
    name="bottleneck",
    config_cls=BottleneckConfig,
    make_part=BottleneckPart,
    fill_defaults=_fill_defaults,
    accepts=_accepts,
    summary="bottleneck adapter (down, non-linearity, up) after or beside a layer or sub-layer",
    size=_size,
)
