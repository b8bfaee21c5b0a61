"""Safe file handling shared by every format: safetensors only, JSON only, atomic writes."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import LoadError, ShapeMismatchError, UnsafeFileError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_CONVERT_HINT = (
    "polyadapter never unpickles files. If you trust this file, convert it yourself: "
    "python -c \"import torch, safetensors.torch as st; "
    "st.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\" "
    "and keep the JSON config beside it"
)


def refuse_pickle(path: Path) -> None:
    """Raise UnsafeFileError if ``path`` is, or is a folder holding only, pickled weights."""
    if path.is_file() and path.suffix in PICKLE_SUFFIXES:
        raise UnsafeFileError(f"{path}: pickle-based weights are refused. {_CONVERT_HINT}")
    if path.is_dir():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        has_safe = any(p.suffix == ".safetensors" for p in path.iterdir())
        if pickles and not has_safe:
            raise UnsafeFileError(f"{path}: holds only pickle-based weights {pickles}. {_CONVERT_HINT}")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LoadError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise LoadError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None


def check_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    """Every expected name present, nothing extra, same shapes, same dtype kind."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if extra:
            parts.append(f"unexpected {len(extra)} tensor(s), e.g. {extra[:3]}")
        raise LoadError(f"{where}: tensor names do not fit the model: " + "; ".join(parts))
    for key, want in expected.items():
        got = found[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ShapeMismatchError(
                f"{where}: tensor {key!r} has shape {tuple(got.shape)}, the model expects {tuple(want.shape)}")
        if got.dtype.is_floating_point != want.dtype.is_floating_point:
            raise LoadError(f"{where}: tensor {key!r} has dtype {got.dtype}, the model expects {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise LoadError(f"{where}: tensor {key!r} holds NaN or inf values")


def write_folder(dst: Path, files: dict[str, object], overwrite: bool = False) -> Path:
    """Write ``files`` (name -> dict for JSON, or dict of tensors for ``*.safetensors``)
    into ``dst`` atomically: everything is written to a temporary sibling folder that
    replaces ``dst`` only once complete. An existing ``dst`` is kept unless ``overwrite``."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists; pass overwrite=True to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        for name, content in files.items():
            if name.endswith(".safetensors"):
                save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(tmp / name))
            else:
                (tmp / name).write_text(json.dumps(content, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
