"""Adapter files: polyadapter's native folder, PEFT's folder and AdapterHub's (the
``adapters`` library). Dispatch by content: ``polyadapter.json`` is native; an
``adapter_config.json`` with ``"version": "adapters.*"`` (or an
``adapter_fusion_config.json``) is AdapterHub's; another ``adapter_config.json`` is PEFT's."""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, LoadError
from . import native
from .files import refuse_pickle
from .folders import recover

FORMATS = ("native", "peft", "adapters")


def save_adapter(model, name: str, path: Path, format: str = "native", overwrite: bool = False) -> Path:
    if format == "native":
        return native.save(model, name, path, overwrite=overwrite)
    if format == "peft":
        from . import peft
        return peft.save(model, name, path, overwrite=overwrite)
    if format == "adapters":
        from . import adapterhub
        return adapterhub.save(model, name, path, overwrite=overwrite)
    raise ConfigError(f"unknown adapter format {format!r}; choose one of {FORMATS}")


def detect_format(path: Path) -> str:
    path = Path(path)
    if "\0" in str(path):
        raise LoadError(f"{str(path)!r}: a path cannot hold a NUL character")
    recover(path)  # an interrupted replacement of this folder is finished or undone first
    if not path.exists():
        raise LoadError(f"{path}: no such file or folder")
    refuse_pickle(path)
    if path.is_dir() and native.is_native(path):
        return "native"
    from . import adapterhub
    if path.is_dir() and adapterhub.is_adapterhub(path):
        return "adapters"
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return "peft"
    raise LoadError(f"{path}: not an adapter folder (expected {native.CONFIG_FILE} for polyadapter's "
                    f"format, adapter_config.json for PEFT's or AdapterHub's, or adapter_fusion_config.json)")


def load_adapter(model, path: Path, name: str | None = None):
    fmt = detect_format(path)
    if fmt == "native":
        return native.load(model, path, name=name)
    if fmt == "adapters":
        from . import adapterhub
        return adapterhub.load(model, path, name=name)
    from . import peft
    return peft.load(model, path, name=name)


def convert(src: Path, dst: Path, to: str, overwrite: bool = False) -> Path:
    """Convert an adapter folder to another format on files alone (no base model).

    ``to="peft"`` reads a native folder and writes PEFT's ``adapter_config.json`` +
    ``adapter_model.safetensors``; ``to="native"`` does the reverse (the base-model
    fingerprint is then unknown and left empty). ``to="adapters"`` writes AdapterHub's
    folder from a native one (the family from its fingerprint's ``model_type``); an
    AdapterHub folder converts ``to="native"``. The write is atomic; an existing
    ``dst`` is kept unless ``overwrite``."""
    if to not in FORMATS:
        raise ConfigError(f"unknown adapter format {to!r}; choose one of {FORMATS}")
    src, dst = Path(src), Path(dst)
    fmt = detect_format(src)
    if fmt == to:
        raise ConfigError(f"{src} is already in the {to} format; nothing to convert")
    from . import adapterhub, peft
    if to == "adapters":
        if fmt != "native":  # one hop at a time through the native format keeps each step checked
            raise ConfigError(f"{src} is a {fmt} folder; convert it --to native first, then --to adapters")
        return adapterhub.native_to_adapterhub_folder(src, dst, overwrite=overwrite)
    if fmt == "adapters":
        if to != "native":
            raise ConfigError(f"{src} is an AdapterHub folder; convert it --to native first, then --to {to}")
        return adapterhub.adapterhub_to_native_folder(src, dst, overwrite=overwrite)
    if to == "peft":
        return peft.native_to_peft_folder(src, dst, overwrite=overwrite)
    return peft.peft_to_native_folder(src, dst, overwrite=overwrite)
