"""polyadapter's own format: a folder with ``polyadapter.json`` and ``adapter.safetensors``.

The JSON holds the method config (with presets resolved), the sites, the base model's
fingerprint, the library version and the adapter's provenance; the safetensors file
holds every tensor, keyed ``<site>.<parameter>``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .. import __version__
from ..config import config_from_dict
from ..errors import LoadError, PolyAdapterError
from .files import check_tensors, read_json, read_safetensors, write_folder

CONFIG_FILE = "polyadapter.json"
WEIGHTS_FILE = "adapter.safetensors"
FORMAT = "polyadapter-adapter"
FORMAT_VERSION = 1


def is_native(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def save(model, name: str, path: Path, overwrite: bool = False) -> Path:
    record = model.record(name)
    return write(path, name=name, config=record.config, sites=record.sites, saved_modules=record.saved_modules,
                 tensors=model.adapter_state_dict(name),
                 num_parameters=sum(t.numel() for t in model.adapter_parameters(name).values()),
                 base_model=model.state.base_fingerprint, provenance=record.provenance, overwrite=overwrite)


def write(path: Path, *, name: str, config, sites: list[str], saved_modules: list[str],
          tensors: dict[str, torch.Tensor], num_parameters: int, base_model: dict, provenance: dict,
          overwrite: bool = False) -> Path:
    """Write a native folder (atomically) from its parts; ``config`` is a method config."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "name": name,
        "config": config.to_dict(),
        "sites": sites,
        "modules_to_save": saved_modules,
        "num_parameters": int(num_parameters),
        "base_model": base_model,
        "provenance": provenance,
    }
    return write_folder(path, {CONFIG_FILE: meta, WEIGHTS_FILE: tensors}, overwrite=overwrite)


def read_meta(path: Path) -> dict:
    meta = read_json(path / CONFIG_FILE)
    if meta.get("format") != FORMAT:
        raise LoadError(f"{path / CONFIG_FILE}: not a polyadapter adapter (format={meta.get('format')!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LoadError(f"{path / CONFIG_FILE}: format version {meta['format_version']} is newer than this "
                        f"polyadapter ({__version__}) reads; upgrade polyadapter")
    return meta


def load(model, path: Path, name: str | None = None):
    meta = read_meta(path)
    where = str(path / CONFIG_FILE)
    config = config_from_dict(meta.get("config"), where=where)
    name = name or meta.get("name")
    try:
        plan = model.plan_adapter(name, config)
    except PolyAdapterError as e:
        raise type(e)(f"{path}: {e}") from None
    want_sites = list(meta.get("sites", []))
    if set(plan.record.sites) != set(want_sites):
        missing = sorted(set(want_sites) - set(plan.record.sites))
        extra = sorted(set(plan.record.sites) - set(want_sites))
        raise LoadError(f"{where}: the adapter's sites do not fit this model: "
                        f"saved sites not found here {missing[:3]}, sites here not in the file {extra[:3]}")
    tensors = read_safetensors(path / WEIGHTS_FILE)
    check_tensors(tensors, plan.state_dict(), str(path / WEIGHTS_FILE))
    _compare_fingerprint(meta.get("base_model", {}), model.state.base_fingerprint, path)
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
