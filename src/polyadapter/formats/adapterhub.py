"""AdapterHub's folders (the ``adapters`` library, 1.x): read and write.

An adapter folder holds ``adapter_config.json`` (``{"config": {...}, "name",
"model_type", "hidden_size", "version": "adapters.X"}``) and ``adapter.safetensors``
(``pytorch_adapter.bin`` by default — a pickle, refused); optionally a prediction head
(``head_config.json`` + ``model_head.safetensors``). A fusion folder holds
``adapter_fusion_config.json`` + ``model_adapter_fusion.safetensors``. PEFT folders use
``adapter_config.json`` too; they are told apart by ``version`` (``adapters.*``) and
the ``config`` object (PEFT's file has ``peft_type`` at the top).

How the files map to polyadapter (``presets.ADAPTERHUB_LOCATIONS`` says, per family,
which of our sites an AdapterHub location means):

=========================================================  ==============================
AdapterHub tensor                                          polyadapter
=========================================================  ==============================
``<loc>.adapters.<n>.adapter_down.0.{weight,bias}``        ``<site>.down.*`` (bottleneck)
  (``adapter_down.1`` when ``ln_before``: ``.0`` is the LN) ``<site>.ln_before.*``
``<loc>.adapters.<n>.adapter_up.{weight,bias}``            ``<site>.up.*``
``<loc>.adapters.<n>.adapter_norm_after.*``                ``<site>.ln_after.*``
``<site>.loras.<n>.lora_A`` / ``lora_B`` (``add``)         ``<site>.lora_A`` / ``lora_B``
``<site>.loras.<n>.lora_B`` (``scale``: (IA)^3)            ``<site>.ia3_l`` (times alpha)
``<loc>.adapter_fusion_layer.<a,b>.{query,key,value}.*``   fusion (``style="adapterhub"``)
``model_head.safetensors`` of a static head                ``modules_to_save`` copies
=========================================================  ==============================

Bottleneck configs: ``original_ln_before`` picks the site kind ("sum": the block's
LayerNorm on post-LN models / the layer on pre-LN ones; else "output": the sub-layer's
output projection), ``is_parallel`` the output block (``par_bn``). Refused, with the
field named: ``phm_layer`` (Compacter), ``use_gating``, ``inv_adapter`` (invertible
adapters), ``cross_adapter``, ``stochastic_depth``, ``scaling`` "learned"/"channel",
``original_ln_after=false``, ``residual_before_ln`` other than true, a per-layer
``reduction_factor`` whose widths differ, other architectures (``prefix_tuning``,
``prompt_tuning``, ``union`` (MAM), ``reft``, VeRA, DoRA), LoRA ``use_gating`` and
composition modes other than ``add``/``scale``, fusion configs other than "dynamic",
and flex prediction heads (``heads.<name>.*``), which have no module in a plain model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import ConfigError, LoadError, PolyAdapterError, UnsafeFileError
from ..methods import config_from_dict
from ..names import safe_name
from ..presets import (
    ADAPTERHUB_LOCATIONS,
    FAMILY_OF_MODEL_TYPE,
    LAYER_INDEX,
    model_family,
)
from ..sites import original_modules
from ..validate import check_file
from .files import (
    _CONVERT_HINT,
    check_tensors,
    config_from_file,
    read_json,
    read_safetensors,
    write_folder,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
HEAD_CONFIG_FILE = "head_config.json"
HEAD_WEIGHTS_FILE = "model_head.safetensors"
HEAD_PICKLE_FILE = "pytorch_model_head.bin"
FUSION_CONFIG_FILE = "adapter_fusion_config.json"
FUSION_WEIGHTS_FILE = "model_adapter_fusion.safetensors"
FUSION_PICKLE_FILE = "pytorch_model_adapter_fusion.bin"
WRITTEN_VERSION = "adapters.1.3.0"  # the version whose files we write (and test against)

_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "swish": "swish", "silu": "silu", "tanh": "tanh"}
_BN_KEY = re.compile(r"(?P<loc>.+)\.adapters\.(?P<name>[^.]+)\.(?P<param>.+)")
_LORA_KEY = re.compile(r"(?P<site>.+)\.loras\.(?P<name>[^.]+)\.(?P<param>lora_A|lora_B)")
_FUSION_PARAM = re.compile(r"(?P<site>.+)\.(?P<param>(?:query|key|value)\.(?:weight|bias))")
_FUSION_KEY = re.compile(r"(?P<loc>.+)\.adapter_fusion_layer\.(?P<name>[^.]+)\.(?P<param>(?:query|key|value)\.(?:weight|bias))")


# ====================================================================== typed checks
class _Loose(BaseModel):
    # AdapterHub adds fields between releases; the ones we read are typed, the others
    # pass here and are checked by value in the readers below (refused where set).
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="allow")


class AdapterHubConfig(_Loose):
    """``adapter_config.json`` (and the shape of ``head_config.json``)."""

    config: dict[str, Any] | None
    name: str | None = None
    model_type: str | None = None
    model_class: str | None = None
    model_name: str | None = None
    hidden_size: int | None = None
    version: str


class AdapterHubBottleneck(_Loose):
    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | dict[str, float]
    non_linearity: str | None
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    cross_adapter: bool = False
    leave_out: list[int] = []
    dropout: float = 0.0
    phm_layer: bool = False
    stochastic_depth: float | None = 0.0


class AdapterHubLora(_Loose):
    architecture: str
    r: int
    alpha: float
    dropout: float = 0.0
    composition_mode: str = "add"
    use_gating: bool = False
    use_dora: bool = False
    leave_out: list[int] = []


class AdapterHubFusion(_Loose):
    adapter_names: list[str]
    config: dict[str, Any]
    name: str | None = None
    version: str


# Every field adapters 1.3 writes for these configs. Fields not listed (a newer release's)
# are refused when set to anything but a neutral value: they might change the computation.
_BN_FIELDS = {
    "architecture", "mh_adapter", "output_adapter", "reduction_factor", "non_linearity", "original_ln_before",
    "original_ln_after", "ln_before", "ln_after", "init_weights", "init_weights_seed", "is_parallel", "scaling",
    "use_gating", "residual_before_ln", "adapter_residual_before_ln", "inv_adapter", "inv_adapter_reduction_factor",
    "cross_adapter", "leave_out", "dropout", "phm_layer", "phm_dim", "factorized_phm_W", "shared_W_phm",
    "shared_phm_rule", "factorized_phm_rule", "phm_c_init", "phm_init_range", "learn_phm",
    "hypercomplex_nonlinearity", "phm_rank", "phm_bias", "stochastic_depth",
}
_LORA_FIELDS = {
    "architecture", "selfattn_lora", "intermediate_lora", "output_lora", "leave_out", "r", "alpha", "dropout",
    "attn_matrices", "composition_mode", "init_weights", "init_weights_seed", "use_gating", "dtype", "use_dora",
    "vera_d", "vera_b",
}


def _check_unknown(cfg: dict, known: set[str], where: str) -> None:
    for key, value in cfg.items():
        if key not in known and value not in (None, False, 0, "", [], {}):
            _refuse(where, key, value, "a field polyadapter does not know, set to a non-neutral value; it may "
                                       "change what the adapter computes")


def _refuse(where: str, key: str, value, why: str):
    raise LoadError(f"{where}: AdapterHub config {key}={value!r}: {why}")


# ====================================================================== detection
def is_adapterhub(path: Path) -> bool:
    """True for an AdapterHub adapter or fusion folder."""
    path = Path(path)
    if (path / FUSION_CONFIG_FILE).is_file():
        return True
    if not (path / CONFIG_FILE).is_file():
        return False
    data = read_json(path / CONFIG_FILE)
    version = data.get("version")
    return "peft_type" not in data and isinstance(version, str) and version.startswith("adapters.")


def _family(model_type, where: str) -> str:
    found = FAMILY_OF_MODEL_TYPE.get(model_type)
    family = found if isinstance(found, str) else (found[0] if found else None)
    if family not in ADAPTERHUB_LOCATIONS:
        raise LoadError(f"{where}: model_type={model_type!r}: polyadapter has no map of AdapterHub's adapter "
                        f"locations for this model family (it has {sorted(ADAPTERHUB_LOCATIONS)})")
    return family


def _split_layer(name: str, family: str) -> tuple[str, int, str] | None:
    """(layer prefix, layer index, the rest) of a module name, by the family's layer container."""
    m = re.search(LAYER_INDEX[family], name)
    if m is None:
        return None
    end = m.end(1)
    return name[:end], int(m.group(1)), name[end + 1:]


def _site_of(loc: str, kind: str, family: str, where: str) -> str:
    parts = _split_layer(loc, family)
    table = ADAPTERHUB_LOCATIONS[family]
    if parts is None or parts[2] not in table:
        raise LoadError(f"{where}: AdapterHub location {loc!r} is not one polyadapter knows for family "
                        f"{family!r} (known: layer.N.{{{', '.join(table)}}})")
    suffix = table[parts[2]].get(kind)
    if suffix is None:
        what = {"sum": "original_ln_before=true (seq_bn)", "block": "is_parallel=true (par_bn)",
                "output": "original_ln_before=false"}[kind]
        raise LoadError(f"{where}: a bottleneck with {what} at {loc!r} has no faithful site on family {family!r}: "
                        f"the value it reads is a local variable of the layer's forward there, not a module's "
                        f"input or output")
    return parts[0] + ("." + suffix if suffix else "")


def _location_of(site: str, family: str) -> tuple[str, str] | None:
    """(AdapterHub location, kind) of one of our sites, or None."""
    parts = _split_layer(site, family)
    if parts is None:
        return None
    layer, _, rest = parts
    for rel, kinds in ADAPTERHUB_LOCATIONS[family].items():
        for kind, suffix in kinds.items():
            if rest == suffix:
                return f"{layer}.{rel}", kind
    return None


# ====================================================================== AdapterHub -> ours
@dataclass
class NativeForm:
    """An AdapterHub adapter in our terms (keys as ``AdapterModel.adapter_state_dict``)."""

    config: dict
    sites: list[str]
    tensors: dict[str, torch.Tensor]
    head: dict[str, torch.Tensor] = field(default_factory=dict)  # base parameter name -> head tensor
    provenance: dict = field(default_factory=dict)


def read_config(path: Path) -> AdapterHubConfig:
    file = path / CONFIG_FILE
    return check_file(AdapterHubConfig, read_json(file), str(file))


def _weights(path: Path, safe: str, pickle: str) -> dict[str, torch.Tensor]:
    if (path / safe).is_file():
        return read_safetensors(path / safe)
    if (path / pickle).is_file():
        raise UnsafeFileError(f"{path}: holds {pickle} (pickle) but no {safe}; save it with "
                              f"save_adapter(..., use_safetensors=True), or: {_CONVERT_HINT}")
    raise LoadError(f"{path}: {safe} not found")


def from_adapterhub(path: Path, family: str | None = None) -> NativeForm:
    """Read an AdapterHub adapter folder into our terms. Pure: needs no model. The model
    family comes from the file's ``model_type``, else ``family`` (the model's, on load)."""
    path = Path(path)
    meta = read_config(path)
    where = str(path / CONFIG_FILE)
    if meta.config is None:
        raise LoadError(f"{where}: 'config' is null; not an adapter")
    family = _family(meta.model_type, where) if meta.model_type is not None or family is None else family
    if family not in ADAPTERHUB_LOCATIONS:
        raise LoadError(f"{where}: polyadapter has no map of AdapterHub's adapter locations for family {family!r}")
    tensors = _weights(path, WEIGHTS_FILE, PICKLE_FILE)
    cfg = meta.config
    arch = cfg.get("architecture", "bottleneck") or "bottleneck"
    if arch == "bottleneck" and "original_ln_before" in cfg:
        form = _bottleneck(cfg, tensors, family, where)
    elif arch == "lora":
        form = _lora(cfg, tensors, where)
    else:
        _refuse(where, "architecture", arch, "polyadapter reads AdapterHub's bottleneck, LoRA and (IA)^3 adapters; "
                                            "prefix tuning, prompt tuning, MAM/union, ReFT and VeRA have no "
                                            "faithful polyadapter form")
    form.head = _read_head(path)
    form.provenance = {k: v for k, v in {"source_format": "adapters", "adapters_version": meta.version,
                                         "model_name": meta.model_name or None, "adapterhub_name": meta.name}.items()
                       if v}
    return form


def _bottleneck(cfg: dict, tensors: dict, family: str, where: str) -> NativeForm:
    c = check_file(AdapterHubBottleneck, cfg, where)
    _check_unknown(cfg, _BN_FIELDS, where)
    if c.phm_layer:
        _refuse(where, "phm_layer", True, "PHM layers (Compacter) are not supported")
    if c.use_gating:
        _refuse(where, "use_gating", True, "gated adapters are not supported")
    if c.inv_adapter:
        _refuse(where, "inv_adapter", c.inv_adapter, "invertible adapters act on the embeddings; not supported")
    if c.cross_adapter:
        _refuse(where, "cross_adapter", True, "cross-attention adapters are not supported")
    if c.stochastic_depth:
        _refuse(where, "stochastic_depth", c.stochastic_depth, "stochastic depth is not supported")
    if isinstance(c.scaling, str):
        _refuse(where, "scaling", c.scaling, "only a fixed number is supported (not learned/channel scaling)")
    if not c.original_ln_after:
        _refuse(where, "original_ln_after", False, "the block's residual and LayerNorm would be dropped; only "
                                                   "original_ln_after=true is supported")
    if c.original_ln_before and not c.is_parallel and c.residual_before_ln is not True:
        _refuse(where, "residual_before_ln", c.residual_before_ln,
                "with original_ln_before=true only residual_before_ln=true is supported (other values add the "
                "block's residual input twice or need it apart from the sum)")
    act = (c.non_linearity or "").lower()
    if act not in _ACTIVATIONS:
        _refuse(where, "non_linearity", c.non_linearity, f"polyadapter has {sorted(_ACTIVATIONS)}")
    kind = "block" if c.is_parallel else "sum" if c.original_ln_before else "output"
    names = {"adapter_down.0.weight": "down.weight", "adapter_down.0.bias": "down.bias",
             "adapter_up.weight": "up.weight", "adapter_up.bias": "up.bias",
             "adapter_norm_after.weight": "ln_after.weight", "adapter_norm_after.bias": "ln_after.bias"}
    if c.ln_before:  # adapter_down = Sequential(LayerNorm, Linear, act); the LN is also adapter_norm_before
        names.update({"adapter_down.1.weight": "down.weight", "adapter_down.1.bias": "down.bias",
                      "adapter_norm_before.weight": "ln_before.weight", "adapter_norm_before.bias": "ln_before.bias",
                      "adapter_down.0.weight": "ln_before.weight", "adapter_down.0.bias": "ln_before.bias"})
    out: dict[str, torch.Tensor] = {}
    sites: list[str] = []
    adapter_names = set()
    for key, t in tensors.items():
        m = _BN_KEY.fullmatch(key)
        if m is None or m["param"] not in names:
            raise LoadError(f"{where}: tensor {key!r} is not a bottleneck tensor polyadapter knows")
        adapter_names.add(m["name"])
        site = _site_of(m["loc"], kind, family, where)
        if site not in sites:
            sites.append(site)
        ours = f"{site}.{names[m['param']]}"
        if ours in out and not torch.equal(out[ours], t):  # ln_before's LayerNorm, under its two names
            raise LoadError(f"{where}: tensor {key!r} differs from the other copy of {names[m['param']]!r} at "
                            f"{m['loc']!r}; the file is ambiguous, so it is refused")
        out[ours] = t
    if len(adapter_names) != 1:
        raise LoadError(f"{where}: expected the tensors of one adapter, found {sorted(adapter_names)}")
    widths = {out[f"{s}.down.weight"].shape[0] for s in sites if f"{s}.down.weight" in out}
    if len(widths) != 1:
        _refuse(where, "reduction_factor", c.reduction_factor, f"bottleneck widths differ across layers "
                                                               f"({sorted(widths)}); polyadapter keeps one width")
    config = {"method": "bottleneck", "mode": "sequential",
              "placement": {"block": "par_bn", "sum": "seq_bn", "output": "double_seq_bn"}[kind],
              "targets": sites, "hidden_size": widths.pop(), "activation": _ACTIVATIONS[act],
              "scale": float(c.scaling), "dropout": float(c.dropout), "ln_before": c.ln_before,
              "ln_after": c.ln_after, "adapter_residual_before_ln": c.adapter_residual_before_ln}
    return NativeForm(config=config, sites=sites, tensors=out)


def _lora(cfg: dict, tensors: dict, where: str) -> NativeForm:
    c = check_file(AdapterHubLora, cfg, where)
    _check_unknown(cfg, _LORA_FIELDS, where)
    if c.use_gating:
        _refuse(where, "use_gating", True, "gated LoRA is not supported")
    if c.use_dora:
        _refuse(where, "use_dora", True, "DoRA is not supported")
    for key in ("vera_d", "vera_b"):
        if cfg.get(key) not in (None, 0, 0.0):
            _refuse(where, key, cfg[key], "VeRA is not supported")
    if c.composition_mode not in ("add", "scale"):
        _refuse(where, "composition_mode", c.composition_mode, "polyadapter reads 'add' (LoRA) and 'scale' ((IA)^3)")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            raise LoadError(f"{where}: tensor {key!r} is not a LoRA tensor polyadapter knows")
        parts.setdefault(m["site"], {})[m["param"]] = t
    sites = list(parts)
    out: dict[str, torch.Tensor] = {}
    if c.composition_mode == "scale":
        for site, got in parts.items():
            if "lora_B" not in got or got["lora_B"].dim() != 2 or got["lora_B"].shape[1] != 1:
                raise LoadError(f"{where}: (IA)^3 site {site!r}: expected lora_B of shape (out, 1), found "
                                f"{ {k: tuple(v.shape) for k, v in got.items()} }")
            out[f"{site}.ia3_l"] = got["lora_B"] * float(c.alpha)  # adapters scales by alpha (not alpha / r)
        config = {"method": "ia3", "targets": sites, "feedforward": [], "placement": "adapterhub"}
    else:
        for site, got in parts.items():
            for p in ("lora_A", "lora_B"):
                if p not in got:
                    raise LoadError(f"{where}: LoRA site {site!r} has no {p}")
                out[f"{site}.{p}"] = got[p]
        config = {"method": "lora", "targets": sites, "r": c.r, "alpha": float(c.alpha), "dropout": float(c.dropout)}
    return NativeForm(config=config, sites=sites, tensors=out)


def _read_head(path: Path) -> dict[str, torch.Tensor]:
    """A static head's tensors keyed by the base model's parameter names ({} without a head)."""
    if not (path / HEAD_CONFIG_FILE).is_file():
        if (path / HEAD_PICKLE_FILE).is_file():
            raise UnsafeFileError(f"{path}: holds {HEAD_PICKLE_FILE} (pickle). {_CONVERT_HINT}")
        return {}
    file = path / HEAD_CONFIG_FILE
    head = check_file(AdapterHubConfig, read_json(file), str(file))
    if head.config is not None:
        raise LoadError(f"{file}: a flex prediction head (head_type={head.config.get('head_type')!r}) belongs to "
                        f"AdapterHub's *AdapterModel classes and has no module in a plain model; move "
                        f"{HEAD_CONFIG_FILE} and {HEAD_WEIGHTS_FILE} out of the folder to load the adapter alone")
    return _weights(path, HEAD_WEIGHTS_FILE, HEAD_PICKLE_FILE)


# ====================================================================== model level
def load(model, path: Path, name: str | None = None):
    """Load an AdapterHub adapter or fusion folder as a new adapter; all or nothing."""
    path = Path(path)
    if (path / FUSION_CONFIG_FILE).is_file():
        return _load_fusion(model, path, name)
    form = from_adapterhub(path, family=model_family(model.model))
    name = name or safe_name(path.resolve().name)
    config = dict(form.config)
    head = _head_modules(model, form.head, str(path / HEAD_WEIGHTS_FILE))
    tensors = dict(form.tensors)
    if head:
        config["modules_to_save"] = sorted(head)
        for module, params in head.items():
            tensors.update({f"{module}.module.{p}": t for p, t in params.items()})
    config = config_from_file(config, str(path / CONFIG_FILE))
    try:
        plan = model.plan_adapter(name, config, filled=True)
    except PolyAdapterError as e:
        raise type(e)(f"{path}: {e}") from None
    if set(plan.record.sites) != set(form.sites):
        raise LoadError(f"{path}: the adapter's sites do not fit this model: "
                        f"{sorted(set(form.sites) ^ set(plan.record.sites))[:3]}")
    where = str(path / WEIGHTS_FILE)
    check_tensors(tensors, plan.state_dict(), where)
    plan.load_tensors(tensors)
    plan.record.provenance = form.provenance
    model.install(plan)
    return plan.record


def _head_modules(model, head: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """Head tensors that differ from the base, grouped by the module owning them: those
    become ``modules_to_save`` copies. A head equal to the base's own needs no copy."""
    if not head:
        return {}
    params = dict(model.model.named_parameters())
    modules = original_modules(model.model)
    changed = {}
    for key, t in head.items():
        here = params.get(key)
        if here is None:
            here = _site_param(model, key)
        if here is None:
            raise LoadError(f"{where}: head tensor {key!r} names no parameter of this model")
        if tuple(here.shape) != tuple(t.shape):
            raise LoadError(f"{where}: head tensor {key!r} has shape {tuple(t.shape)}, the model's "
                            f"{tuple(here.shape)}")
        if not torch.equal(here.detach().cpu().to(t.dtype), t):
            changed[key] = t
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key in changed:
        module = key.rpartition(".")[0]
        if module not in modules:
            raise LoadError(f"{where}: head tensor {key!r}: no module {module!r} to copy")
        out.setdefault(module, {})
    for module, params in out.items():  # a copy holds every parameter of the module: unchanged ones from the base
        for p, v in modules[module].named_parameters():
            params[p] = head.get(f"{module}.{p}", v.detach())
    return out


def _site_param(model, key: str):
    for n, m in original_modules(model.model).items():
        prefix = n + "."
        if key.startswith(prefix) and "." not in key[len(prefix):]:
            return getattr(m, key[len(prefix):], None)
    return None


def _load_fusion(model, path: Path, name: str | None):
    file = path / FUSION_CONFIG_FILE
    meta = check_file(AdapterHubFusion, read_json(file), str(file))
    where = str(file)
    fc = meta.config
    want = {"key": True, "query": True, "value": True, "value_before_softmax": True, "residual_before": False,
            "temperature": False, "query_before_ln": False}
    for k, v in want.items():
        if fc.get(k, v) != v:
            _refuse(where, f"config.{k}", fc.get(k), f"polyadapter reads AdapterHub's 'dynamic' fusion ({k}={v})")
    missing = [a for a in meta.adapter_names if a not in model.state.adapters]
    if missing:
        raise LoadError(f"{where}: the fusion is over {meta.adapter_names}; load those adapters first (under "
                        f"those names) — missing {missing}")
    fused_sites = {s for a in meta.adapter_names for s in model.record(a).sites}
    family = model_family(model.model)
    if family not in ADAPTERHUB_LOCATIONS:
        raise LoadError(f"{where}: polyadapter has no map of AdapterHub's locations for family {family!r}")
    tensors = _weights(path, FUSION_WEIGHTS_FILE, FUSION_PICKLE_FILE)
    out, sites = {}, []
    for key, t in tensors.items():
        m = _FUSION_KEY.fullmatch(key)
        if m is None:
            raise LoadError(f"{path / FUSION_WEIGHTS_FILE}: tensor {key!r} is not a fusion tensor polyadapter knows")
        candidates = [s for s in fused_sites if _location_of(s, family) and _location_of(s, family)[0] == m["loc"]]
        if len(candidates) != 1:
            raise LoadError(f"{path / FUSION_WEIGHTS_FILE}: tensor {key!r}: the fused adapters have "
                            f"{len(candidates)} sites at AdapterHub location {m['loc']!r}; expected one")
        if candidates[0] not in sites:
            sites.append(candidates[0])
        out[f"{candidates[0]}.{m['param']}"] = t
    config = {"method": "fusion", "adapters": list(meta.adapter_names), "style": "adapterhub", "targets": sites}
    name = name or safe_name(path.resolve().name)
    try:
        config = config_from_dict(config, where=where)
        plan = model.plan_adapter(name, config, filled=True)
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    except PolyAdapterError as e:
        raise type(e)(f"{path}: {e}") from None
    check_tensors(out, plan.state_dict(), str(path / FUSION_WEIGHTS_FILE))
    plan.load_tensors(out)
    plan.record.provenance = {"source_format": "adapters", "adapters_version": meta.version}
    model.install(plan)
    return plan.record


# ====================================================================== ours -> AdapterHub
def to_adapterhub(config: dict, tensors: dict[str, torch.Tensor], sites: list[str], family: str, name: str,
                  model_type: str | None, hidden_size: int | None, where: str,
                  num_layers: int | None = None) -> tuple[dict, dict]:
    """(adapter_config.json content, adapter.safetensors tensors) for one of our
    bottleneck, LoRA or (IA)^3 adapters. Pure. ``num_layers`` (when a model is at hand)
    lets ``leave_out`` name layers with no site at all."""
    method = config.get("method")
    if family not in ADAPTERHUB_LOCATIONS:
        raise ConfigError(f"{where}: polyadapter has no map of AdapterHub's locations for family {family!r}")
    if method == "bottleneck":
        body, out = _bottleneck_out(config, tensors, sites, family, name, where, num_layers)
    elif method in ("lora", "ia3"):
        body, out = _lora_out(config, tensors, sites, family, name, where, num_layers)
    else:
        raise ConfigError(f"{where}: AdapterHub's format cannot hold method {method!r}; it holds bottleneck, lora, "
                          f"ia3 and fusion adapters. Save it in the native format instead")
    meta = {"config": body, "hidden_size": hidden_size, "model_class": None, "model_name": None,
            "model_type": model_type, "name": name, "version": WRITTEN_VERSION}
    return meta, out


def _layers(sites: list[str], family: str) -> set[int]:
    return {p[1] for p in (_split_layer(s, family) for s in sites) if p is not None}


def _leave_out(sites_by_group: dict[str, set[int]], num_layers: int | None, where: str) -> list[int]:
    present = set().union(*sites_by_group.values())
    total = set(range(num_layers)) if num_layers else present
    for group, layers in sites_by_group.items():
        if layers != present:
            raise ConfigError(f"{where}: {group} sites are in layers {sorted(layers)} but the adapter's other "
                              f"sites in {sorted(present)}; AdapterHub applies one layer set (leave_out) to all")
    return sorted(total - present)


def _bottleneck_out(config, tensors, sites, family, name, where, num_layers):
    if config.get("mode") == "parallel":
        raise ConfigError(f"{where}: mode='parallel' (beside a sub-layer, reading its input) has no AdapterHub "
                          f"form; AdapterHub's parallel adapter is placement='par_bn'")
    if not config.get("residual", True) or config.get("learned_scale"):
        key = "residual" if not config.get("residual", True) else "learned_scale"
        raise ConfigError(f"{where}: {key}={config.get(key)!r} has no AdapterHub form")
    groups: dict[str, set[int]] = {}
    kinds = set()
    out: dict[str, torch.Tensor] = {}
    ln_before = bool(config.get("ln_before"))
    for s in sites:
        found = _location_of(s, family)
        if found is None:
            raise ConfigError(f"{where}: site {s!r} is not one of AdapterHub's adapter locations for family "
                              f"{family!r}")
        loc, kind = found
        kinds.add(kind)
        groups.setdefault(_split_layer(loc, family)[2], set()).add(_split_layer(s, family)[1])
        down = "adapter_down.1" if ln_before else "adapter_down.0"
        mapping = {"down.weight": f"{down}.weight", "down.bias": f"{down}.bias", "up.weight": "adapter_up.weight",
                   "up.bias": "adapter_up.bias", "ln_after.weight": "adapter_norm_after.weight",
                   "ln_after.bias": "adapter_norm_after.bias"}
        if ln_before:
            mapping.update({"ln_before.weight": "adapter_norm_before.weight", "ln_before.bias": "adapter_norm_before.bias"})
        for ours, theirs in mapping.items():
            if f"{s}.{ours}" in tensors:
                out[f"{loc}.adapters.{name}.{theirs}"] = tensors[f"{s}.{ours}"]
        if ln_before:  # adapters registers the LayerNorm twice; its loader expects both names
            out[f"{loc}.adapters.{name}.adapter_down.0.weight"] = tensors[f"{s}.ln_before.weight"].clone()
            out[f"{loc}.adapters.{name}.adapter_down.0.bias"] = tensors[f"{s}.ln_before.bias"].clone()
    if len(kinds) != 1:
        raise ConfigError(f"{where}: the adapter mixes AdapterHub site kinds {sorted(kinds)}; one kind per adapter")
    kind = kinds.pop()
    leave_out = _leave_out(groups, num_layers, where)
    widths = {int(tensors[f"{s}.down.weight"].shape[0]) for s in sites}
    in_width = int(tensors[f"{sites[0]}.down.weight"].shape[1])
    hidden = widths.pop()
    rf = in_width / hidden
    if in_width // rf != hidden:  # adapters computes the width as int(width // reduction_factor)
        raise ConfigError(f"{where}: no reduction_factor gives bottleneck width {hidden} from {in_width}")
    has_attention = any(g.startswith("attention") for g in groups)
    has_output = any(not g.startswith("attention") for g in groups)
    body = {
        "adapter_residual_before_ln": bool(config.get("adapter_residual_before_ln")), "cross_adapter": False,
        "dropout": float(config.get("dropout", 0.0)), "factorized_phm_W": True, "factorized_phm_rule": False,
        "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "mam_adapter" if kind == "block" else "bert",
        "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None,
        "is_parallel": kind == "block", "learn_phm": True, "leave_out": leave_out,
        "ln_after": bool(config.get("ln_after")), "ln_before": ln_before, "mh_adapter": has_attention,
        "non_linearity": config.get("activation", "relu"), "original_ln_after": True,
        "original_ln_before": kind == "sum", "output_adapter": has_output, "phm_bias": True, "phm_c_init": "normal",
        "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False, "phm_rank": 1,
        "reduction_factor": int(rf) if float(rf).is_integer() else rf, "residual_before_ln": True,
        "scaling": float(config.get("scale", 1.0)), "shared_W_phm": False, "shared_phm_rule": True,
        "stochastic_depth": 0.0, "use_gating": False,
    }
    if body["non_linearity"] == "identity":
        raise ConfigError(f"{where}: activation='identity' has no AdapterHub name")
    return body, out


# Which AdapterHub LoRA switch a site's last name part means (adapters 1.3's module wrapping).
_LORA_SWITCHES = {
    "bert": {"query": ("selfattn", "q"), "key": ("selfattn", "k"), "value": ("selfattn", "v"),
             "intermediate.dense": ("intermediate", None), "output.dense": ("output", None)},
    "llama": {"self_attn.q_proj": ("selfattn", "q"), "self_attn.k_proj": ("selfattn", "k"),
              "self_attn.v_proj": ("selfattn", "v"), "mlp.down_proj": ("intermediate", None),
              "mlp.up_proj": ("output", None)},
}


def _lora_out(config, tensors, sites, family, name, where, num_layers):
    switches = _LORA_SWITCHES.get(family)
    if switches is None:
        raise ConfigError(f"{where}: polyadapter has no map of AdapterHub's LoRA layers for family {family!r}")
    groups: dict[str, set[int]] = {}
    attn, out, used = [], {}, set()
    for s in sites:
        parts = _split_layer(s, family)
        rest = parts[2] if parts else None
        if family == "bert" and rest and rest.startswith("attention.self."):
            rest = rest[len("attention.self."):]
        if rest not in switches or (rest == "output.dense" and "attention" in s):
            raise ConfigError(f"{where}: site {s!r} is not a layer AdapterHub's LoRA wraps")
        switch, matrix = switches[rest]
        used.add(switch)
        groups.setdefault(matrix or switch, set()).add(parts[1])
        if matrix and matrix not in attn:
            attn.append(matrix)
        if config["method"] == "ia3":
            if f"{s}.ia3_l" not in tensors or tensors[f"{s}.ia3_l"].shape[-1] != 1:
                raise ConfigError(f"{where}: (IA)^3 site {s!r} scales its input (feed-forward, PEFT's convention); "
                                  f"AdapterHub's (IA)^3 only scales outputs — use IA3Config(placement='adapterhub')")
            out[f"{s}.loras.{name}.lora_B"] = tensors[f"{s}.ia3_l"]
        else:
            out[f"{s}.loras.{name}.lora_A"] = tensors[f"{s}.lora_A"]
            out[f"{s}.loras.{name}.lora_B"] = tensors[f"{s}.lora_B"]
    leave_out = _leave_out(groups, num_layers, where)
    ia3 = config["method"] == "ia3"
    if not ia3 and (config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora")
                    or config.get("init") == "pissa"):
        raise ConfigError(f"{where}: per-site ranks/alphas, rsLoRA and PiSSA have no AdapterHub form")
    body = {
        "alpha": 1 if ia3 else _num(config["alpha"]), "architecture": "lora", "attn_matrices": sorted(attn),
        "composition_mode": "scale" if ia3 else "add", "dropout": 0.0 if ia3 else float(config.get("dropout", 0.0)),
        "dtype": None, "init_weights": "ia3" if ia3 else "lora", "init_weights_seed": None,
        "intermediate_lora": "intermediate" in used, "leave_out": leave_out,
        "output_lora": "output" in used, "r": 1 if ia3 else int(config["r"]),
        "selfattn_lora": bool(attn), "use_dora": False, "use_gating": False, "vera_b": None, "vera_d": None,
    }
    return body, out


def _num(v):
    return int(v) if float(v).is_integer() else float(v)


def save(model, name: str, path: Path, overwrite: bool = False) -> Path:
    record = model.record(name)
    where = f"adapter {name!r}"
    family = model_family(model.model)
    base_config = getattr(model.model, "config", None)
    if record.config.method == "fusion":
        return _save_fusion(model, name, Path(path), family, overwrite, where)
    state = model.adapter_state_dict(name)
    num_layers = getattr(base_config, "num_hidden_layers", None)
    meta, tensors = to_adapterhub(record.config.to_dict(), state, record.sites, family, name,
                                  getattr(base_config, "model_type", None),
                                  getattr(base_config, "hidden_size", None), where, num_layers=num_layers)
    files: dict[str, object] = {CONFIG_FILE: meta, WEIGHTS_FILE: tensors}
    if record.saved_modules:  # module copies -> a static head, keyed by the base's parameter names
        head = {}
        for module in record.saved_modules:
            prefix = f"{module}.module."
            head.update({f"{module}.{k[len(prefix):]}": t for k, t in state.items() if k.startswith(prefix)})
        files[HEAD_CONFIG_FILE] = {"config": None, "hidden_size": meta["hidden_size"], "model_class": None,
                                   "model_name": None, "model_type": meta["model_type"], "name": None,
                                   "version": WRITTEN_VERSION}
        files[HEAD_WEIGHTS_FILE] = head
    return write_folder(Path(path), files, overwrite=overwrite)


def _save_fusion(model, name, path, family, overwrite, where):
    record = model.record(name)
    if record.config.style != "adapterhub":
        raise ConfigError(f"{where}: only style='adapterhub' fusion layers have AdapterHub's form "
                          f"(ours scales scores by 1/sqrt(width) and has a value bias)")
    joined = ",".join(record.config.adapters)
    out = {}
    for key, t in model.adapter_state_dict(name).items():
        m = _FUSION_PARAM.fullmatch(key)
        found = _location_of(m["site"], family) if m else None
        if found is None:
            raise ConfigError(f"{where}: fusion tensor {key!r} is not at one of AdapterHub's locations")
        out[f"{found[0]}.adapter_fusion_layer.{joined}.{m['param']}"] = t
    base_config = getattr(model.model, "config", None)
    meta = {"adapter_names": list(record.config.adapters),
            "config": {"dropout_prob": None, "key": True, "query": True, "query_before_ln": False,
                       "regularization": False, "residual_before": False, "temperature": False, "value": True,
                       "value_before_softmax": True, "value_initialized": True},
            "hidden_size": getattr(base_config, "hidden_size", None), "model_class": None, "model_name": None,
            "model_type": getattr(base_config, "model_type", None), "name": joined, "version": WRITTEN_VERSION}
    if not math.isclose(record.config.temperature, 1.0):
        raise ConfigError(f"{where}: temperature={record.config.temperature} has no AdapterHub form (T=1)")
    return write_folder(path, {FUSION_CONFIG_FILE: meta, FUSION_WEIGHTS_FILE: out}, overwrite=overwrite)


# ====================================================================== file level
def native_to_adapterhub_folder(src: Path, dst: Path, overwrite: bool = False) -> Path:
    """Convert a native folder to AdapterHub's without a model; the family comes from the
    native file's base-model fingerprint (``model_type``)."""
    from . import native
    src = Path(src)
    meta = native.read_meta(src)
    config = config_from_dict(meta.get("config"), where=str(src / native.CONFIG_FILE)).to_dict()
    model_type = (meta.get("base_model") or {}).get("model_type")
    if model_type is None:
        raise LoadError(f"{src}: the base model's type is unknown (converted without a base), so AdapterHub's "
                        f"locations cannot be chosen; load it onto its model and save with format='adapters'")
    family = _family(model_type, str(src / native.CONFIG_FILE))
    tensors = native.read_weights(src, meta)[1]
    if config["method"] == "fusion":
        raise ConfigError(f"{src}: a fusion layer's AdapterHub locations depend on the fused adapters' kinds; "
                          f"load them onto the model and save with format='adapters'")
    if meta.get("modules_to_save"):
        raise ConfigError(f"{src}: module copies become an AdapterHub head only with the model at hand; load "
                          f"the adapter and save with format='adapters'")
    ah_meta, out = to_adapterhub(config, tensors, list(meta.get("sites", [])), family, meta.get("name") or "adapter",
                                 model_type, None, str(src))
    return write_folder(Path(dst), {CONFIG_FILE: ah_meta, WEIGHTS_FILE: out}, overwrite=overwrite)


def adapterhub_to_native_folder(src: Path, dst: Path, overwrite: bool = False) -> Path:
    """Convert an AdapterHub adapter folder to the native format without a model."""
    from . import native
    src, dst = Path(src), Path(dst)
    if (src / FUSION_CONFIG_FILE).is_file():
        raise LoadError(f"{src}: a fusion folder's sites depend on the fused adapters; load the adapters and the "
                        f"fusion onto the model and save it from there")
    form = from_adapterhub(src)
    if form.head:
        raise LoadError(f"{src}: holds a prediction head ({HEAD_WEIGHTS_FILE}); whether it differs from the base's "
                        f"needs the base model: load it onto the model and save from there")
    config = config_from_file(form.config, str(src / CONFIG_FILE))
    return native.write(dst, name=safe_name(dst.resolve().name), config=config, sites=form.sites, saved_modules=[],
                        tensors=form.tensors, num_parameters=sum(t.numel() for t in form.tensors.values()),
                        base_model={}, provenance=form.provenance, overwrite=overwrite)
