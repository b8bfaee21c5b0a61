"""PEFT's adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors``.

What PEFT 0.21 writes (``PeftModel.save_pretrained``), and how it maps to ours:

==========================================  ==========================================
PEFT tensor key                              polyadapter key
==========================================  ==========================================
``base_model.model.<site>.lora_A.weight``    ``<site>.lora_A``   (r, in)   Linear, Conv1D
``base_model.model.<site>.lora_B.weight``    ``<site>.lora_B``   (out, r)
``base_model.model.<site>.lora_embedding_A`` ``<site>.lora_A``   (r, num_embeddings)
``base_model.model.<site>.lora_embedding_B`` ``<site>.lora_B``   (dim, r)
``base_model.model.<site>.ia3_l``            ``<site>.ia3_l``    (out, 1), or (1, in) feed-forward
``base_model.model.<module>.<param>``        ``<module>.module.<param>``  (``modules_to_save``)
``base_model.model.<site>.base_layer.<p>``   none: a copy of the base weight (PEFT saves the
                                             embedding layer when it is targeted); checked
                                             equal to the base, then dropped
==========================================  ==========================================

Keys that still carry the adapter name (``lora_A.default.weight``,
``classifier.modules_to_save.default.weight``) are read too. Conv1D needs no transposing:
PEFT's ``fan_in_fan_out`` only changes how it merges.

Config: ``r``, ``lora_alpha`` (our ``alpha``), ``lora_dropout`` (``dropout``),
``use_rslora``, ``init_lora_weights`` (``"gaussian"`` -> ``init="gaussian"``, else
``default``), ``target_modules``, ``modules_to_save``; for IA3 ``target_modules``,
``feedforward_modules`` and ``modules_to_save``. Name rules differ slightly: a PEFT
*list* target matches a module named exactly so or ending in ``.name`` (our rule too);
a PEFT *string* target is a regex matched in full (our ``re:<regex>``);
``feedforward_modules`` and ``modules_to_save`` entries match any name that merely ends
with them (written as ``re:.*<name>`` here when that differs from our dotted rule).
Where a pattern cannot be carried over exactly (``exclude_modules``,
``layers_to_transform``, PEFT's skipping of targets inside ``modules_to_save``, our
``all-linear``), the exact site names that the file holds are used instead: the tensors
say which modules PEFT adapted. ``rank_pattern``/``alpha_pattern`` are read into ours,
resolved to the exact sites whose rank or alpha differs from the config's.

DoRA (``use_dora: true``): ``base_model.model.<site>.lora_magnitude_vector`` (out,) is our
``<site>.lora_magnitude``, for Linear and Conv1D sites.

Refused, with the field named: ``bias`` other than ``"none"``,
``lora_bias``, ``layer_replication``, inits that rewrite the base weights (``pissa*``,
``olora``, ``corda``, ``loftq``, ``lora_ga``), peft types other than LORA and IA3, and
any other config field we do not know whose value is set (not null/false/empty).

Our PiSSA parts (``W x + s (B A - B0 A0) x``) are written as a plain LoRA of rank 2r:
``A' = [A; A0]``, ``B' = [B, -B0]``, with ``lora_alpha`` chosen to keep the scaling.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import (
    ConfigError,
    LoadError,
    PolyAdapterError,
    ShapeMismatchError,
    TargetError,
    UnsafeFileError,
)
from ..methods import config_from_dict
from ..names import safe_name
from ..sites import matches, matches_any, original_modules, pattern_value
from ..validate import PeftFields, check_file
from .files import (
    _CONVERT_HINT,
    check_tensors,
    config_from_file,
    read_json,
    read_safetensors,
    refuse_pickle,
    write_folder,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
PREFIX = "base_model.model."
PEFT_TYPES = {"LORA": "lora", "IA3": "ia3"}

# Config fields that do not change what the adapter computes once its weights exist.
_IGNORED = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "fan_in_fan_out", "megatron_core", "qalora_group_size", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "ensure_weight_tying", "layers_pattern", "init_ia3_weights",
}
_HANDLED = {
    "LORA": {"r", "lora_alpha", "lora_dropout", "use_rslora", "target_modules", "modules_to_save",
             "exclude_modules", "layers_to_transform", "rank_pattern", "alpha_pattern", "init_lora_weights",
             "use_dora", "bias", "lora_bias", "layer_replication"},
    "IA3": {"target_modules", "feedforward_modules", "modules_to_save", "exclude_modules"},
}
# init_lora_weights values for which PEFT rewrites the base weights: the adapter only
# works on that modified base.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Last name components that mark an embedding layer, for file-level conversion only
# (a native file does not record module types; with a model at hand we look).
_EMBEDDING_NAMES = {"wte", "wpe", "shared", "embed_in", "tok_embeddings", "embedding", "embeddings"}

_LORA_KEY = re.compile(r"(?P<site>.+)\.(?P<param>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight")
_LORA_EMB_KEY = re.compile(r"(?P<site>.+)\.lora_embedding_(?P<param>A|B)(?:\.(?P<adapter>[^.]+))?")
_DORA_KEY = re.compile(r"(?P<site>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[^.]+)\.weight|\.weight)?")
_IA3_KEY = re.compile(r"(?P<site>.+)\.ia3_l(?:\.(?P<adapter>[^.]+))?")
_SAVED_NAMED_KEY = re.compile(r"(?P<module>.+)\.modules_to_save\.(?P<adapter>[^.]+)\.(?P<param>.+)")
_BASE_COPY_KEY = re.compile(r"(?P<module>.+)\.(?:base_layer|original_module)\.(?P<param>.+)")


# ====================================================================== PEFT -> ours
@dataclass
class NativeForm:
    """A PEFT adapter in our terms: config dict, sites, saved modules and tensors keyed
    as ``AdapterModel.adapter_state_dict`` keys them."""

    config: dict
    sites: list[str]
    saved_modules: list[str]
    tensors: dict[str, torch.Tensor]
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict)  # base parameter name -> PEFT's copy
    other: dict[str, torch.Tensor] = field(default_factory=dict)        # keys that fit nothing above
    exact_config: dict = field(default_factory=dict)  # the config with exact site names as patterns


def method_of(peft_config: dict, where: str) -> str:
    """Our method name for a PEFT config's ``peft_type``; LoadError for a type we do not read."""
    peft_type = peft_config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise LoadError(f"{where}: peft_type={peft_type!r} is not supported; polyadapter reads PEFT's "
                        f"{' and '.join(PEFT_TYPES)} adapters")
    return PEFT_TYPES[peft_type]


def from_peft(peft_config: dict, peft_tensors: dict[str, torch.Tensor], where: str = "PEFT adapter",
              exact_order: bool = False) -> NativeForm:
    """Translate PEFT's (config, tensors) to ours. Pure: needs no model.

    ``exact_order``: make ``sites`` follow the order in which our target resolution
    would list them on the model (needed for a native file); where that order cannot be
    told from names alone, the returned config targets exact site names."""
    method = method_of(peft_config, where)
    peft_type = peft_config["peft_type"]
    _check_fields(peft_config, peft_type, where)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    named_saved: list[tuple[str, str, torch.Tensor]] = []  # (module, parameter, tensor)
    base_copies: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    adapter_names: set[str] = set()
    foreign: list[str] = []
    origin: dict[tuple[str, str], str] = {}  # (site or module, parameter) -> the file key it came from

    def claim(owner: str, param: str, key: str) -> None:
        """Two file keys for one weight (e.g. with and without the adapter name): ambiguous."""
        if (owner, param) in origin:
            raise LoadError(f"{where}: tensors {origin[(owner, param)]!r} and {key!r} are both the {param} of "
                            f"{owner!r}; the file is ambiguous, so it is refused")
        origin[(owner, param)] = key

    for key, t in peft_tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if m := _LORA_KEY.fullmatch(k) or _LORA_EMB_KEY.fullmatch(k):
            kind = "lora"
        elif m := _DORA_KEY.fullmatch(k):
            kind = "dora"
        elif m := _IA3_KEY.fullmatch(k):
            kind = "ia3"
        elif m := _SAVED_NAMED_KEY.fullmatch(k):
            claim(m["module"], m["param"], key)
            named_saved.append((m["module"], m["param"], t))
            adapter_names.add(m["adapter"])
            continue
        elif m := _BASE_COPY_KEY.fullmatch(k):
            base_copies[f"{m['module']}.{m['param']}"] = t
            continue
        else:
            rest[k] = t
            continue
        if (kind if kind != "dora" else "lora") != method:
            foreign.append(key)
            continue
        param = "ia3_l" if kind == "ia3" else "lora_magnitude" if kind == "dora" else "lora_" + m["param"][-1]
        claim(m["site"], param, key)
        parts.setdefault(m["site"], {})[param] = t
        if m["adapter"] is not None:
            adapter_names.add(m["adapter"])
    if foreign:
        raise LoadError(f"{where}: a {peft_type} adapter holds tensors of another method, e.g. {foreign[:3]}")
    if len(adapter_names) > 1:
        raise LoadError(f"{where}: the file holds tensors of several adapters {sorted(adapter_names)}; "
                        f"PEFT saves one adapter per folder")
    odd = sorted(k for k in rest if re.search(r"\.(lora_|ia3_)", k))
    if odd:
        raise LoadError(f"{where}: tensor(s) {odd[:3]} have no polyadapter equivalent "
                        f"(e.g. DoRA magnitudes or LoRA biases)")
    if not parts:
        raise LoadError(f"{where}: the file holds no {peft_type} tensors")
    r = peft_config.get("r", 8)
    dora = bool(peft_config.get("use_dora"))
    for site, got in parts.items():
        need = ("lora_A", "lora_B") + (("lora_magnitude",) if dora else ()) if method == "lora" else ("ia3_l",)
        missing = [p for p in need if p not in got]
        if missing:
            what = "lora_magnitude_vector (use_dora is true)" if missing[0] == "lora_magnitude" else missing[0]
            raise LoadError(f"{where}: site {site!r} has {sorted(got)} but no {what}")
        if "lora_magnitude" in got and not dora:
            raise LoadError(f"{where}: site {site!r} has a DoRA magnitude vector but the config says use_dora=false; "
                            f"the file does not fit its config")
        if method == "lora":
            _check_lora_shapes(site, got["lora_A"], got["lora_B"], _pattern_value(
                peft_config.get("rank_pattern") or {}, site, r), where)

    # modules_to_save: a tensor belongs to the outermost module whose name ends with an entry.
    mts = _as_list(peft_config.get("modules_to_save"))
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, torch.Tensor] = {}
    saved: list[str] = []
    for k, t in rest.items():
        owner = _saved_owner(k, mts)
        if owner is None:
            other[k] = t
        else:
            claim(owner, k[len(owner) + 1:], k)
            named_saved.append((owner, k[len(owner) + 1:], t))
    for owner, param, t in named_saved:
        if owner not in saved:
            saved.append(owner)
        tensors[f"{owner}.module.{param}"] = t
    saved.sort(key=_natural)

    sites = sorted(parts, key=_natural)
    for site in sites:
        tensors.update({f"{site}.{p}": t for p, t in parts[site].items()})

    exact = list(sites)
    force_exact = bool(peft_config.get("exclude_modules")) or peft_config.get("layers_to_transform") not in (None, [])
    targets = exact if force_exact else _targets_from_peft(peft_config.get("target_modules"), sites, saved, where)
    if exact_order:
        sites, certain = _resolution_order(targets, sites)
        if not certain:
            targets = exact = sites
    saved_patterns = _suffix_patterns(mts, saved)

    if method == "lora":
        r, alpha, rank_pattern, alpha_pattern = _rank_and_alpha(peft_config, sites)
        init = peft_config.get("init_lora_weights", True)
        config = {"method": "lora", "targets": targets, "modules_to_save": saved_patterns, "r": r, "alpha": alpha,
                  "rank_pattern": rank_pattern or None, "alpha_pattern": alpha_pattern or None,
                  "dropout": float(peft_config.get("lora_dropout") or 0.0),
                  "use_rslora": bool(peft_config.get("use_rslora", False)),
                  "use_dora": bool(peft_config.get("use_dora", False)),
                  "init": "gaussian" if init == "gaussian" else "default"}
    else:
        ff_spec = peft_config.get("feedforward_modules")
        ff = _feedforward_from_peft(ff_spec, sites, where)
        _check_ia3_shapes(parts, ff, where)
        config = {"method": "ia3", "targets": targets, "modules_to_save": saved_patterns, "feedforward": ff}
    exact_config = dict(config, targets=exact, modules_to_save=list(saved))
    if method == "ia3":
        exact_config["feedforward"] = [s for s in sites if matches_any(s, config["feedforward"])]
    return NativeForm(config=config, sites=sites, saved_modules=saved, tensors=tensors,
                      base_copies=base_copies, other=other, exact_config=exact_config)


def _check_fields(cfg: dict, peft_type: str, where: str) -> None:
    def refuse(key, why):
        raise LoadError(f"{where}: PEFT config {key}={cfg[key]!r}: {why}")

    if peft_type == "LORA":
        if cfg.get("bias", "none") not in ("none", None):
            refuse("bias", "the adapter changes the base model's biases; polyadapter keeps the base frozen "
                           "and reads only bias='none'")
        if cfg.get("lora_bias"):
            refuse("lora_bias", "LoRA B biases are not supported")
        if cfg.get("layer_replication"):
            refuse("layer_replication", "PEFT duplicates base layers for this adapter; not supported")
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            refuse("init_lora_weights", "with this init PEFT rewrites the base weights, so the adapter only "
                                        "works on that modified base. Save it from PEFT with "
                                        "save_pretrained(..., path_initial_model_for_weight_conversion=...) to "
                                        "get a plain LoRA, and load that")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in cfg.get(key) or {}:
            try:
                re.compile(pattern)
            except re.error as e:
                raise LoadError(f"{where}: PEFT config {key} key {pattern!r} is not a valid regular expression: "
                                f"{e}") from None
    for key, value in cfg.items():
        if key in _IGNORED or key in _HANDLED[peft_type]:
            continue
        if value not in (None, False, "", [], {}):
            refuse(key, f"this field of PEFT's {peft_type} config has no polyadapter equivalent")


def _as_list(spec) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        return [spec]
    return list(dict.fromkeys(spec))  # PEFT may repeat entries (e.g. "classifier" for SEQ_CLS)


def _saved_owner(key: str, entries: list[str]) -> str | None:
    """The outermost module (a proper prefix of ``key``) whose name ends with an entry:
    PEFT's ``modules_to_save`` rule is ``name.endswith(entry)``."""
    comps = key.split(".")
    for i in range(1, len(comps)):
        prefix = ".".join(comps[:i])
        if any(prefix.endswith(e) for e in entries):
            return prefix
    return None


def _suffix_patterns(entries: list[str], names: list[str]) -> list[str]:
    """Our patterns for PEFT's ``endswith`` entries, keeping those that hit ``names``."""
    out = []
    for e in entries:
        hits = [n for n in names if n.endswith(e)]
        if not hits:
            continue  # PEFT ignores entries that match nothing (e.g. "score" on a BERT)
        p = e if all(matches(n, e) for n in hits) else "re:.*" + re.escape(e)
        if p not in out:
            out.append(p)
    return out


def _targets_from_peft(spec, sites: list[str], saved: list[str], where: str) -> list[str]:
    if spec is None or spec == "all-linear" or spec == []:
        return list(sites)
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as e:
            raise LoadError(f"{where}: target_modules={spec!r} is not a valid regular expression: {e}") from None
        patterns = ["re:" + spec]
    else:
        patterns = [p for p in dict.fromkeys(spec) if any(matches(s, p) for s in sites)]
    stray = [s for s in sites if not matches_any(s, patterns)]
    if stray:
        raise LoadError(f"{where}: the file holds tensors for {stray[:3]}, which target_modules={spec!r} "
                        f"does not match; the config does not fit the tensors")
    if any(matches_any(m, patterns) for m in saved):
        return list(sites)  # PEFT skips targets inside modules_to_save; our patterns would not
    return patterns


def _feedforward_from_peft(spec, sites: list[str], where: str) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as e:
            raise LoadError(f"{where}: feedforward_modules={spec!r} is not a valid regular expression: {e}") from None
        return ["re:" + spec] if any(re.fullmatch(spec, s) for s in sites) else []
    return _suffix_patterns(_as_list(spec), sites)


def _check_ia3_shapes(parts: dict, feedforward: list[str], where: str) -> None:
    for site, got in parts.items():
        shape = tuple(got["ia3_l"].shape)
        if len(shape) != 2 or 1 not in shape:
            raise LoadError(f"{where}: ia3_l of site {site!r} has shape {shape}; expected (out, 1) or (1, in)")
        ff = matches_any(site, feedforward)
        if shape != (1, 1) and ff != (shape[0] == 1):
            kind = "feed-forward (1, in)" if ff else "(out, 1)"
            raise LoadError(f"{where}: feedforward_modules makes site {site!r} {kind}, but its ia3_l has "
                            f"shape {shape}")


def _rank_and_alpha(cfg: dict, sites: list[str]) -> tuple[int, float, dict, dict]:
    """(r, alpha, rank_pattern, alpha_pattern) in our terms: PEFT's patterns resolved to
    exact site names for the sites whose value differs from the config's default."""
    r, alpha = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    ranks = {s: _pattern_value(cfg.get("rank_pattern") or {}, s, r) for s in sites}
    alphas = {s: _pattern_value(cfg.get("alpha_pattern") or {}, s, alpha) for s in sites}
    return (r, alpha, {s: v for s, v in ranks.items() if v != r},
            {s: float(v) for s, v in alphas.items() if v != alpha})


def _check_lora_shapes(site: str, A: torch.Tensor, B: torch.Tensor, r: int, where: str) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
        raise ShapeMismatchError(f"{where}: site {site!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                                 f"which do not fit the config's rank r={r} (expected ({r}, in) and (out, {r}))")


def _pattern_value(pattern: dict, site: str, default):
    """PEFT's ``get_pattern_key``: the first key that matches a dotted suffix, as a regex."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", site):
            return pattern[key]
    return pattern.get(site, default)


def _natural(name: str):
    return [(0, int(c), "") if c.isdigit() else (1, 0, c) for c in re.split(r"(\d+)", name)]


def _resolution_order(patterns: list[str], sites: list[str]) -> tuple[list[str], bool]:
    """Sites in the order ``resolve_targets`` gives: by the first pattern that matches,
    then module order. Module order is known from names alone when a pattern's sites
    differ only in their layer numbers (ModuleLists count up); else ``certain`` is False."""
    ordered, certain = [], True
    for p in patterns:
        group = [s for s in sites if s not in ordered and matches(s, p)]
        if len({re.sub(r"\d+", "#", s) for s in group}) > 1:
            certain = False
        ordered.extend(sorted(group, key=_natural))
    return ordered, certain


# ====================================================================== ours -> PEFT
def to_peft(config: dict, tensors: dict[str, torch.Tensor], sites: list[str], saved_modules: list[str],
            embedding_sites: set[str], conv1d_sites: set[str] = frozenset(), module_names: list[str] | None = None,
            base_model_name_or_path: str | None = None, where: str = "adapter") -> tuple[dict, dict]:
    """Translate our (config dict, tensors) to PEFT's. Pure. ``module_names`` (all module
    names of the base, when a model is at hand) lets the written patterns be checked to
    select exactly our sites under PEFT's rules; without it, plain patterns are trusted."""
    method = config.get("method")
    if method not in ("lora", "ia3"):
        raise ConfigError(f"{where}: PEFT's format cannot hold method {method!r}; it holds lora and ia3 "
                          f"adapters. Save it in the native format instead")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for s in saved_modules:
        head = f"{s}.module."
        for k, t in tensors.items():
            if k.startswith(head):
                out[f"{PREFIX}{s}.{k[len(head):]}"] = t
                used.add(k)
    mts = _peft_modules_to_save(config.get("modules_to_save") or [], saved_modules, module_names)

    if method == "lora":
        pissa = any(f"{s}.lora_A0" in tensors for s in sites)
        r, alpha, rslora = config["r"], float(config["alpha"]), bool(config.get("use_rslora"))
        for s in sites:
            A, B = tensors[f"{s}.lora_A"], tensors[f"{s}.lora_B"]
            used.update({f"{s}.lora_A", f"{s}.lora_B"})
            if pissa:
                if f"{s}.lora_A0" not in tensors:
                    raise ConfigError(f"{where}: site {s!r} lacks the PiSSA factors lora_A0/lora_B0 other sites have")
                A = torch.cat([A, tensors[f"{s}.lora_A0"].to(A.dtype)], dim=0)
                B = torch.cat([B, -tensors[f"{s}.lora_B0"].to(B.dtype)], dim=1)
                used.update({f"{s}.lora_A0", f"{s}.lora_B0"})
            if s in embedding_sites:
                out[f"{PREFIX}{s}.lora_embedding_A"], out[f"{PREFIX}{s}.lora_embedding_B"] = A, B
            else:
                out[f"{PREFIX}{s}.lora_A.weight"], out[f"{PREFIX}{s}.lora_B.weight"] = A, B
            if f"{s}.lora_magnitude" in tensors:
                out[f"{PREFIX}{s}.lora_magnitude_vector"] = tensors[f"{s}.lora_magnitude"]
                used.add(f"{s}.lora_magnitude")
        rank_pattern = {s: int(tensors[f"{s}.lora_A"].shape[0]) for s in sites}
        alpha_pattern = {s: float(pattern_value(config.get("alpha_pattern"), s, alpha)) for s in sites}
        if pissa:  # rank 2r, same scaling alpha/r (or alpha/sqrt(r) with rsLoRA)
            factor = math.sqrt(2) if rslora else 2
            alpha, r = alpha * factor, 2 * r
            rank_pattern = {s: 2 * v for s, v in rank_pattern.items()}
            alpha_pattern = {s: v * factor for s, v in alpha_pattern.items()}
        rank_pattern = {s: v for s, v in rank_pattern.items() if v != r}
        alpha_pattern = {s: (int(v) if float(v).is_integer() else v) for s, v in alpha_pattern.items() if v != alpha}
        targets = _peft_targets(config.get("targets") or [], sites, module_names, mts)
        peft_config = {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True,
            "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "lora_dropout": float(config.get("dropout", 0.0)), "use_rslora": rslora,
            "target_modules": targets, "exclude_modules": None, "modules_to_save": mts,
            "fan_in_fan_out": bool(conv1d_sites), "bias": "none", "lora_bias": False,
            "use_dora": bool(config.get("use_dora")),
            "init_lora_weights": "gaussian" if config.get("init") == "gaussian" else True,
            "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        }
    else:
        for s in sites:
            out[f"{PREFIX}{s}.ia3_l"] = tensors[f"{s}.ia3_l"]
            used.add(f"{s}.ia3_l")
        targets = _peft_targets(config.get("targets") or [], sites, module_names, mts)
        ff = _peft_feedforward(config.get("feedforward") or [], sites, targets)
        peft_config = {
            "peft_type": "IA3", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "target_modules": targets, "exclude_modules": None,
            "feedforward_modules": ff, "modules_to_save": mts, "fan_in_fan_out": bool(conv1d_sites),
            "init_ia3_weights": True,
        }
    left = sorted(set(tensors) - used)
    if left:
        raise ConfigError(f"{where}: tensor(s) {left[:3]} have no place in PEFT's {method} format")
    return peft_config, out


def _peft_hits(spec, names: list[str], mts: list[str] | None) -> set[str]:
    """Module names PEFT's ``check_target_module_exists`` selects for ``spec``."""
    hits = set()
    for n in names:
        if mts and any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in mts):
            continue
        if isinstance(spec, str):
            ok = re.fullmatch(spec, n) is not None
        else:
            ok = n in spec or any(n.endswith("." + t) for t in spec)
        if ok:
            hits.add(n)
    return hits


def _peft_targets(patterns: list[str], sites: list[str], names: list[str] | None, mts: list[str] | None):
    """``target_modules`` that selects exactly ``sites`` under PEFT's rules: our plain
    patterns when they do, else one regex, else the site names themselves."""
    candidates = []
    if patterns and all(not p.startswith("re:") and p != "all-linear" for p in patterns):
        candidates.append(list(patterns))
    elif len(patterns) == 1 and patterns[0].startswith("re:"):
        candidates.append(patterns[0][3:])
    candidates.append(list(sites))
    for spec in candidates:
        if names is None or _peft_hits(spec, names, mts) == set(sites):
            return spec
    return "|".join(re.escape(s) for s in sites)


def _peft_modules_to_save(patterns: list[str], saved: list[str], names: list[str] | None) -> list[str] | None:
    if not saved:
        return None
    if patterns and all(not p.startswith("re:") for p in patterns):
        if names is None or {n for n in names if any(n.endswith(p) for p in patterns)} == set(saved):
            return list(patterns)
    return list(saved)  # extra modules PEFT may also wrap are unchanged copies: harmless


def _peft_feedforward(patterns: list[str], sites: list[str], targets):
    ff_sites = {s for s in sites if matches_any(s, patterns)}
    if not ff_sites:
        return []
    plain = [p for p in patterns if not p.startswith("re:") and any(matches(s, p) for s in sites)]
    if plain and {s for s in sites if any(s.endswith(p) for p in plain)} == ff_sites \
            and (isinstance(targets, str) or set(plain) <= set(targets)):
        return plain
    return "|".join(re.escape(s) for s in sorted(ff_sites, key=_natural))


def _embedding_by_name(site: str) -> bool:
    last = site.rsplit(".", 1)[-1].lower()
    return "embed" in last or last in _EMBEDDING_NAMES


# ====================================================================== model level
def save(model, name: str, path: Path, overwrite: bool = False) -> Path:
    record = model.record(name)
    where = f"adapter {name!r}"
    if record.config.method not in PEFT_TYPES.values():
        raise ConfigError(f"{where}: PEFT's format cannot hold method {record.config.method!r}; it holds lora "
                          f"and ia3 adapters. Save it in the native format instead")
    parts = model.parts(name)
    base_config = getattr(model.model, "config", None)
    peft_config, tensors = to_peft(
        record.config.to_dict(), model.adapter_state_dict(name), record.sites, record.saved_modules,
        embedding_sites={s for s in record.sites if getattr(parts[s], "is_embedding", False)},
        conv1d_sites={s for s in record.sites if getattr(parts[s], "is_conv1d", False)},
        module_names=[n for n in original_modules(model.model)],
        base_model_name_or_path=getattr(base_config, "name_or_path", None) or None,
        where=where,
    )
    return write_folder(Path(path), {CONFIG_FILE: peft_config, WEIGHTS_FILE: tensors}, overwrite=overwrite)


def read_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    refuse_pickle(path)
    if not path.is_dir():
        raise LoadError(f"{path}: not a folder; a PEFT adapter is a folder with {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = read_json(path / CONFIG_FILE)
    check_file(PeftFields, config, str(path / CONFIG_FILE))
    if not (path / WEIGHTS_FILE).is_file():
        if (path / PICKLE_FILE).is_file():
            raise UnsafeFileError(f"{path}: holds {PICKLE_FILE} (pickle) but no {WEIGHTS_FILE}. {_CONVERT_HINT}")
        raise LoadError(f"{path}: {WEIGHTS_FILE} not found")
    return config, read_safetensors(path / WEIGHTS_FILE)


def load(model, path: Path, name: str | None = None):
    """Load a PEFT folder as a new adapter (named after the folder unless ``name``).
    Everything is checked before the model is touched."""
    path = Path(path)
    peft_config, peft_tensors = read_folder(path)
    where = str(path / WEIGHTS_FILE)
    form = from_peft(peft_config, peft_tensors, where=str(path))
    name = name or _name_from(path)

    plan, errors = None, []
    for config in (form.config, form.exact_config):  # exact site names when patterns do not carry over
        config = config_from_file(config, str(path / CONFIG_FILE))
        try:
            candidate = model.plan_adapter(name, config, filled=True)
        except TargetError as e:
            errors.append(e)
            continue
        except PolyAdapterError as e:
            raise type(e)(f"{path}: {e}") from None
        if set(candidate.record.sites) == set(form.sites) and \
                set(form.saved_modules) <= set(candidate.record.saved_modules):
            plan = candidate
            break
        errors.append(LoadError(
            f"the adapter's sites do not fit this model: sites in the file not targeted here "
            f"{sorted(set(form.sites) - set(candidate.record.sites))[:3]}, sites targeted here not in the file "
            f"{sorted(set(candidate.record.sites) - set(form.sites))[:3]}"))
    if plan is None:
        raise type(errors[0])(f"{path}: {errors[0]}") from None
    _check_base_copies(model, {**form.base_copies, **form.other}, where, strays=set(form.other))
    check_tensors(form.tensors, plan.state_dict(), where)
    plan.load_tensors(form.tensors)
    plan.record.provenance = _provenance(peft_config)
    model.install(plan)
    return plan.record


def _check_base_copies(model, copies: dict[str, torch.Tensor], where: str, strays: set[str]) -> None:
    """PEFT may store copies of base weights (embedding layers); they must equal ours."""
    if not copies:
        return
    modules = original_modules(model.model)
    for key, saved in copies.items():
        module_name, _, param = key.rpartition(".")
        module = modules.get(module_name) if module_name else model.model
        here = getattr(module, param, None) if module is not None else None
        if not isinstance(here, torch.Tensor):
            what = "fits no adapter parameter and names no parameter of this model" if key in strays else \
                "is a copy of a base weight this model does not have"
            raise LoadError(f"{where}: tensor {key!r} {what}")
        if tuple(here.shape) != tuple(saved.shape) or not torch.equal(here.detach().cpu().to(saved.dtype), saved):
            raise LoadError(f"{where}: the file carries base weight {key!r} (PEFT saves embedding layers that "
                            f"were targeted or resized) and it differs from this model's "
                            f"(shape {tuple(saved.shape)} vs {tuple(here.shape)}); polyadapter keeps the base "
                            f"frozen, so it cannot load this adapter onto this model")


def _provenance(peft_config: dict) -> dict:
    """What a PEFT file says of where the adapter came from."""
    return {k: v for k, v in {
        "source_format": "peft", "peft_version": peft_config.get("peft_version"),
        "base_model_name_or_path": peft_config.get("base_model_name_or_path"),
    }.items() if v}


def _name_from(path: Path) -> str:
    return safe_name(Path(path).resolve().name)


# ====================================================================== file level
def native_to_peft_folder(src: Path, dst: Path, overwrite: bool = False) -> Path:
    """Convert a native folder to PEFT's without a base model. Embedding sites are told
    by name (``embed`` in the last name part, or ``wte``/``shared``/...)."""
    from . import native
    src = Path(src)
    meta = native.read_meta(src)
    config = config_from_dict(meta.get("config"), where=str(src / native.CONFIG_FILE)).to_dict()
    tensors = native.read_weights(src, meta)[1]
    sites = list(meta.get("sites", []))
    peft_config, out = to_peft(config, tensors, sites, list(meta.get("modules_to_save") or []),
                               embedding_sites={s for s in sites if _embedding_by_name(s)},
                               where=str(src))
    return write_folder(Path(dst), {CONFIG_FILE: peft_config, WEIGHTS_FILE: out}, overwrite=overwrite)


@dataclass
class NativeParts:
    """A PEFT folder in the native format's terms, read without a base model."""

    config: object              # the method config
    sites: list[str]
    saved_modules: list[str]
    tensors: dict[str, torch.Tensor]
    provenance: dict


def native_parts(src: Path) -> NativeParts:
    """Read the PEFT folder ``src`` as what a native folder holds (no base model, so
    base-weight copies PEFT stored are dropped with a warning: nothing to check them
    against). Used by :func:`peft_to_native_folder` and the adapter store."""
    src = Path(src)
    peft_config, peft_tensors = read_folder(src)
    form = from_peft(peft_config, peft_tensors, where=str(src), exact_order=True)
    if form.other:
        raise LoadError(f"{src}: tensor(s) {sorted(form.other)[:3]} fit no adapter parameter; if they are base "
                        f"weights PEFT saved (save_embedding_layers), load the adapter onto its base model "
                        f"with polyadapter, which checks them, and save it from there")
    if form.base_copies:
        warnings.warn(f"{src}: dropped {len(form.base_copies)} copies of base weights PEFT stored "
                      f"(e.g. {sorted(form.base_copies)[0]!r}); they are not checked without a base model",
                      stacklevel=3)
    config = config_from_file(form.config, str(src / CONFIG_FILE))
    return NativeParts(config, form.sites, form.saved_modules, form.tensors, _provenance(peft_config))


def peft_to_native_folder(src: Path, dst: Path, overwrite: bool = False) -> Path:
    """Convert a PEFT folder to the native format without a base model (fingerprint left
    empty; see :func:`native_parts`)."""
    from . import native
    parts = native_parts(src)
    return native.write(Path(dst), name=_name_from(Path(dst)), config=parts.config, sites=parts.sites,
                        saved_modules=parts.saved_modules, tensors=parts.tensors,
                        num_parameters=sum(t.numel() for t in parts.tensors.values()), base_model={},
                        provenance=parts.provenance, overwrite=overwrite)
