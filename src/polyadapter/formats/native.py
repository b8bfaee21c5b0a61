"""polyadapter's own format: a folder with ``polyadapter.json`` and ``adapter.safetensors``.

The JSON holds the method config (with presets resolved), the sites, the base model's
fingerprint, the library version and the adapter's provenance; the safetensors file
holds every tensor, keyed ``<site>.<parameter>``.

An adapter made by ComPEFT (provenance ``method: "compeft"``) is saved packed instead:
``adapter.compeft.safetensors`` holds its ternary tensors as bits (see
``formats.compeft``), and the JSON says ``"packing": "compeft-ternary-v1"`` with format
version 2, so a reader that predates packing refuses the folder instead of misreading it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .._version import __version__
from ..errors import LoadError, PolyAdapterError
from ..validate import NativeMeta, check_file
from . import compeft
from .files import check_tensors, config_from_file, read_json, read_safetensors, write_folder

CONFIG_FILE = "polyadapter.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "polyadapter-adapter"
FORMAT_VERSION = 2  # the newest version read; plain folders are still written as version 1
PLAIN_VERSION = 1


def is_native(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def save(model, name: str, path: Path, overwrite: bool = False) -> Path:
    record = model.record(name)
    packing, tensors = weights_for(model, name)
    return write(path, name=name, config=record.config, sites=record.sites, saved_modules=record.saved_modules,
                 tensors=tensors,
                 num_parameters=sum(t.numel() for t in model.adapter_parameters(name).values()),
                 base_model=model.state.base_fingerprint, provenance=record.provenance, overwrite=overwrite,
                 packing=packing)


def is_compeft(provenance: dict) -> bool:
    return provenance.get("operation") == "compress" and provenance.get("method") == "compeft"


def weights_for(model, name: str) -> tuple[str | None, dict[str, torch.Tensor]]:
    """(packing or None, the tensors of the weights file) as :func:`save` writes them.

    A ComPEFT adapter's ternary tensors are packed where that is smaller; one that is no
    longer ternary (trained after compression) stays dense, with a warning; with no tensor
    packed the folder is a plain one."""
    record = model.record(name)
    tensors = model.adapter_state_dict(name)
    if not is_compeft(record.provenance):
        return None, tensors
    inits = compeft.inits_for(record.config.method, record.sites)
    packed, dense = compeft.pack(tensors, inits)
    if dense:
        warnings.warn(f"adapter {name!r}: {len(dense)} of its {len(inits)} ComPEFT tensor(s) are no longer "
                      f"ternary (e.g. {dense[0]!r}; changed since compression?) and are saved unpacked",
                      stacklevel=3)
    if not any(compeft.SEP in k for k in packed):  # nothing packed (or nothing smaller packed)
        return None, tensors
    return compeft.PACKING, packed


def write(path: Path, *, name: str, config, sites: list[str], saved_modules: list[str],
          tensors: dict[str, torch.Tensor], num_parameters: int, base_model: dict, provenance: dict,
          overwrite: bool = False, packing: str | None = None) -> Path:
    """Write a native folder (atomically) from its parts; ``config`` is a method config.
    ``packing``: None for plain tensors, or ``compeft.PACKING`` for packed ones."""
    if packing not in (None, compeft.PACKING):
        raise ValueError(f"unknown packing {packing!r}")
    meta = {
        "format": FORMAT,
        "format_version": PLAIN_VERSION if packing is None else FORMAT_VERSION,
        "library_version": __version__,
        "name": name,
        "config": config.to_dict(),
        "sites": sites,
        "modules_to_save": saved_modules,
        "num_parameters": int(num_parameters),
        "base_model": base_model,
        "provenance": provenance,
    }
    if packing is not None:
        meta["packing"] = packing
    weights = WEIGHTS_FILE if packing is None else compeft.WEIGHTS_FILE
    return write_folder(path, {CONFIG_FILE: meta, weights: tensors}, overwrite=overwrite)


def read_meta(path: Path) -> dict:
    """``polyadapter.json`` of the folder ``path``, checked field by field (types, finite
    numbers, no unknown field; the method config by its own fields) before anything uses it."""
    file = path / CONFIG_FILE
    return check_meta(read_json(file), str(file))


def check_meta(meta: dict, file: str) -> dict:
    """``meta`` (a ``polyadapter.json`` content, from ``file``) if every field is valid."""
    meta_config(meta, file)
    return meta


def meta_config(meta: dict, file: str):
    """The method config of ``meta`` once every field of ``meta`` is checked (the one
    check every read of a native adapter goes through)."""
    if not isinstance(meta, dict):
        raise LoadError(f"{file}: expected a JSON object, found {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise LoadError(f"{file}: not a polyadapter adapter (format={meta.get('format')!r})")
    version = meta.get("format_version", 0)
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise LoadError(f"{file}: format version {version} is newer than this "
                        f"polyadapter ({__version__}) reads; upgrade polyadapter")
    check_file(NativeMeta, meta, str(file))
    return config_from_file(meta["config"], f"{file}: config")


def weights_file(path: Path, meta: dict) -> Path:
    """The weights file of the native folder ``path`` whose JSON is ``meta``:
    ``adapter.safetensors``, or ``adapter.compeft.safetensors`` when packed."""
    packing = meta.get("packing")
    if packing is None:
        return path / WEIGHTS_FILE
    if packing != compeft.PACKING:
        raise LoadError(f"{path / CONFIG_FILE}: unknown packing {packing!r}; this polyadapter "
                        f"({__version__}) reads {compeft.PACKING!r}")
    return path / compeft.WEIGHTS_FILE


def read_weights(path: Path, meta: dict) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the weights file, its tensors, unpacked) of the native folder ``path``."""
    file = weights_file(path, meta)
    tensors = read_safetensors(file)
    return file, tensors if meta.get("packing") is None else compeft.unpack(tensors, str(file))


def load(model, path: Path, name: str | None = None):
    """Load the native folder ``path`` into ``model`` as a new adapter."""
    file = path / CONFIG_FILE
    meta = read_json(file)
    config = meta_config(meta, str(file))  # checked before the weights are read
    weights, tensors = read_weights(path, meta)
    return _install(model, meta, config, tensors, str(path), str(weights), name)


def load_from(model, meta: dict, tensors: dict[str, torch.Tensor], where: str, weights_where: str | None = None,
              name: str | None = None):
    """Install an adapter from a native folder's parts already in memory: ``meta`` (the
    ``polyadapter.json`` content) and ``tensors`` (its unpacked weights). Used by the
    adapter store. Everything is checked before the model changes; ``where`` names the
    source in errors."""
    return _install(model, meta, meta_config(meta, where), tensors, where, weights_where or where, name)


def _install(model, meta: dict, config, tensors: dict[str, torch.Tensor], where: str, weights_where: str,
             name: str | None):
    name = name or meta.get("name")
    try:
        plan = model.plan_adapter(name, config, filled=True)
    except PolyAdapterError as e:
        raise type(e)(f"{where}: {e}") from None
    want_sites = list(meta.get("sites", []))
    if set(plan.record.sites) != set(want_sites):
        missing = sorted(set(want_sites) - set(plan.record.sites))
        extra = sorted(set(plan.record.sites) - set(want_sites))
        raise LoadError(f"{where}: the adapter's sites do not fit this model: "
                        f"saved sites not found here {missing[:3]}, sites here not in the file {extra[:3]}")
    check_tensors(tensors, plan.state_dict(), weights_where)
    _compare_fingerprint(meta.get("base_model", {}), model.state.base_fingerprint, where)
    plan.load_tensors(tensors)
    plan.record.provenance = dict(meta.get("provenance", {}))
    model.install(plan)
    return plan.record


def _compare_fingerprint(saved: dict, here: dict, path: Path) -> None:
    if not saved:
        return
    if saved.get("structure_sha256") != here.get("structure_sha256"):
        warnings.warn(f"{path}: the adapter was trained on a base model of another structure "
                      f"({saved.get('class')}, {saved.get('num_parameters')} parameters); "
                      f"shapes fit, so it was loaded", stacklevel=3)
    elif saved.get("weights_sha256") != here.get("weights_sha256"):
        warnings.warn(f"{path}: the base model's weights differ from those the adapter was trained on",
                      stacklevel=3)
