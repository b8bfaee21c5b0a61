"""Verbs that read adapter folders without a model: info, convert, methods."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PolyAdapterError
from .common import CLIError, _pct, _table, adapter_folder, add_store_arg, human_bytes, is_store_ref


def describe(path: str | Path) -> dict:
    """What an adapter folder (native or PEFT) holds, read from its files only."""
    from ..errors import LoadError
    from ..formats import detect_format
    from ..formats.files import read_json
    from ..validate import PeftFields, check_file

    path = adapter_folder(path)
    fmt = detect_format(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if fmt == "native":
        from ..formats import native
        meta = native.read_meta(path)
        config = meta.get("config") or {}
        tensors = _safetensors_shapes(native.weights_file(path, meta))
        base = meta.get("base_model") or {}
        n_params = meta.get("num_parameters", sum(_numel(s) for s in tensors.values()))
        return {
            "path": str(path), "format": "native", "name": meta.get("name"), "method": config.get("method"),
            "targets": config.get("targets"), "modules_to_save": meta.get("modules_to_save", []),
            "sites": len(meta.get("sites", [])), "parameters": n_params,
            "share_of_base": n_params / base["num_parameters"] if base.get("num_parameters") else None,
            "tensors": len(tensors), "size_bytes": size, "config": config, "base_model": base,
            "library_version": meta.get("library_version"), "provenance": meta.get("provenance", {}),
        }
    if fmt == "adapters":
        return _describe_adapterhub(path, size)
    config = read_json(path / "adapter_config.json")
    check_file(PeftFields, config, str(path / "adapter_config.json"))
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoadError(f"{path}: adapter_model.safetensors not found")
    tensors = _safetensors_shapes(weights)
    markers = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "ia3_l", "lora_magnitude_vector")
    sites = {k.split(f".{m}")[0] for k in tensors for m in markers if f".{m}" in k}
    return {
        "path": str(path), "format": "peft", "name": path.name, "method": str(config.get("peft_type", "?")).lower(),
        "targets": config.get("target_modules"), "modules_to_save": config.get("modules_to_save") or [],
        "sites": len(sites), "parameters": sum(_numel(s) for s in tensors.values()), "share_of_base": None,
        "tensors": len(tensors), "size_bytes": size, "config": config,
        "base_model": {"name_or_path": config.get("base_model_name_or_path")},
        "library_version": config.get("peft_version"), "provenance": {},
    }


def _describe_adapterhub(path: Path, size: int) -> dict:
    """An AdapterHub adapter or fusion folder, from its files (mapped to our terms)."""
    from ..formats import adapterhub as ah
    from ..formats.files import read_json
    from ..validate import check_file
    if (path / ah.FUSION_CONFIG_FILE).is_file():
        meta = check_file(ah.AdapterHubFusion, read_json(path / ah.FUSION_CONFIG_FILE),
                          str(path / ah.FUSION_CONFIG_FILE))
        tensors = _safetensors_shapes(path / ah.FUSION_WEIGHTS_FILE)
        config = {"method": "fusion", "adapters": meta.adapter_names, "style": "adapterhub", **meta.config}
        sites, method, name, version = {k.split(".adapter_fusion_layer.")[0] for k in tensors}, "fusion", \
            meta.name, meta.version
        targets, saved = None, []
    else:
        form = ah.from_adapterhub(path)
        meta = ah.read_config(path)
        tensors = {k: list(v.shape) for k, v in form.tensors.items()}
        config, sites, method = form.config, form.sites, form.config["method"]
        name, version, targets = meta.name, meta.version, form.config.get("targets")
        saved = sorted({k.rpartition(".")[0] for k in form.head})
    n = sum(_numel(s) for s in tensors.values())
    return {
        "path": str(path), "format": "adapters", "name": name, "method": method, "targets": targets,
        "modules_to_save": saved, "sites": len(sites), "parameters": n, "share_of_base": None,
        "tensors": len(tensors), "size_bytes": size, "config": config, "base_model": {},
        "library_version": version, "provenance": {},
    }


def _level(method: str | None) -> str | None:
    from ..methods import METHODS
    return METHODS[method].level if method in METHODS else None


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header alone."""
    from safetensors import safe_open

    from ..errors import LoadError
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LoadError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cmd_info(args) -> int:
    if is_store_ref(args.path):  # a stored version: what `polyadapter store show` prints
        from .store import cmd_show
        args.ref = args.path
        return cmd_show(args)
    d = describe(args.path)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    base = d["base_model"] or {}
    if d["format"] == "adapters":
        base_text = "unknown (AdapterHub files name no base weights)"
    elif d["format"] == "native":
        base_text = (f"{base.get('class')} ({base.get('model_type')}), {base.get('num_parameters', 0):,} parameters, "
                     f"structure {base.get('structure_sha256')}, weights {base.get('weights_sha256')}"
                     if base else "unknown (converted without a base model)")
    else:
        base_text = base.get("name_or_path") or "unknown"
    params = f"{d['parameters']:,}" + (f" ({_pct(d['share_of_base'])} of the base)" if d["share_of_base"] else "")
    targets = d["targets"] if isinstance(d["targets"], str) else ", ".join(d["targets"] or [])
    rows = [
        ("path", d["path"]), ("format", d["format"] + (f" (written by {d['library_version']})"
                                                       if d["library_version"] else "")),
        ("name", str(d["name"])), ("method", str(d["method"])), ("targets", targets or "-"),
        ("modules to save", ", ".join(d["modules_to_save"]) or "-"),
        ("sites", str(d["sites"]) + (" (acts on the input embeddings)" if _level(d["method"]) == "input" else "")),
        ("parameters", params), ("tensors", str(d["tensors"])), ("size on disk", human_bytes(d["size_bytes"])),
        ("base model", base_text),
    ]
    skip = {"method", "targets", "modules_to_save"}
    extra = {k: v for k, v in d["config"].items() if k not in skip} if d["format"] == "native" else {}
    if extra:
        rows.append(("config", ", ".join(f"{k}={v}" for k, v in extra.items())))
    for key, value in (d["provenance"] or {}).items():
        rows.append((f"provenance.{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    print(_table(rows))
    return 0


# ============================================================================ convert, methods
def cmd_convert(args) -> int:
    from .. import formats
    convert = getattr(formats, "convert", None)
    if convert is None:
        raise CLIError("this polyadapter has no format converter (polyadapter.formats.convert)")
    src = adapter_folder(args.src)
    try:
        dst = convert(src, Path(args.dst), args.to, overwrite=args.overwrite)
    except ValueError as e:  # e.g. the folder is already in that format
        if isinstance(e, PolyAdapterError):
            raise
        raise CLIError(str(e)) from None
    print(f"converted {src} -> {dst} ({args.to} format)")
    return 0


def method_table() -> list[dict]:
    from ..methods import METHODS
    out = []
    for name, spec in sorted(METHODS.items()):
        fields = {}
        for f in dataclasses.fields(spec.config_cls):
            if f.default is not dataclasses.MISSING:
                fields[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                fields[f.name] = f.default_factory()
            else:
                fields[f.name] = None
        doc = (spec.config_cls.__doc__ or "").strip()
        out.append({"name": name, "summary": spec.summary, "level": spec.level, "fields": fields,
                    "doc": "" if doc.startswith(spec.config_cls.__name__ + "(") else doc})
    return out


def cmd_methods(args) -> int:
    table = method_table()
    if args.json:
        print(json.dumps(table, indent=2, default=str))
        return 0
    for m in table:
        print(f"{m['name']:<11} {m['summary']}")
        fields = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in m["fields"].items())
        print(f"{'':<11} fields: {fields}")
    print("\nset fields with: polyadapter train --method NAME --set key=value ... (or --config FILE.json)")
    return 0


# ============================================================================ parser, main


# ---------------------------------------------------------------------- parser
def add_parsers(sub) -> None:
    i = sub.add_parser("info", help="describe an adapter folder (native, PEFT or AdapterHub)")
    i.add_argument("path", help="adapter folder, run folder, or store:NAME[@VERSION|@ALIAS]")
    i.add_argument("--json", action="store_true", help="print as JSON")
    add_store_arg(i)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert an adapter folder between the native, PEFT and AdapterHub formats")
    c.add_argument("--to", required=True, choices=("peft", "native", "adapters"))
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.set_defaults(func=cmd_convert)

    m = sub.add_parser("methods", help="list adapter methods and their config fields")
    m.add_argument("--json", action="store_true", help="print as JSON")
    m.set_defaults(func=cmd_methods)


# ---------------------------------------------------------------------- sources of other verbs
@dataclass
class Source:
    """An adapter a verb reads: a folder (native, PEFT, a run folder) or a store
    reference, with what its files say before any model is loaded."""

    spec: str                   # what to hand to load_adapter: a folder path or "store:NAME@V"
    name: str                   # its adapter name
    provenance: dict
    shapes: dict                # tensor name -> shape


def read_source(text: str, store_dir: str | None) -> Source:
    """Resolve and check a source given on the command line (its files, or its stored
    version and hash), naming what is wrong; nothing is loaded into a model yet."""
    if is_store_ref(text):
        from ..store import Store
        with Store(store_dir) as s:
            v = s.resolve(text)
            return Source(f"store:{v.ref}", v.name, dict(v.provenance), dict(v.shapes))
    folder = adapter_folder(text)
    desc = describe(folder)
    weights = next((folder / f for f in ("adapter.safetensors", "adapter_model.safetensors", "adapter.compeft.safetensors")
                    if (folder / f).is_file()), None)
    shapes = _safetensors_shapes(weights) if weights is not None else {}
    return Source(str(folder), desc["name"] or folder.name, desc.get("provenance") or {}, shapes)
