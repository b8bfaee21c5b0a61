"""The rule for adapter names, in one place.

An adapter name is a key of ``nn.ModuleDict`` containers inside every site (and of the
model's input-level parts), a file-key prefix and a command-line word, so it is 1-64
ASCII letters, digits, ``_`` or ``-`` (no dots: they separate module names), and it is
not an attribute those containers already have (``training``, ``forward``, ``keys``...):
``ModuleDict`` would refuse such a key half-way through an installation.
"""
from __future__ import annotations

import re

from torch import nn

from .errors import AdapterNameError

ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
INPUT_SITE = "input_embeddings"  # file-key prefix of input-level parts (prompt tuning)
RESERVED = frozenset(n for n in dir(nn.ModuleDict()) if ADAPTER_NAME.fullmatch(n))


def name_problem(name) -> str | None:
    """Why ``name`` cannot be an adapter name, or None when it can."""
    if not isinstance(name, str):
        return f"adapter name {name!r} is a {type(name).__name__}, not a string"
    if not ADAPTER_NAME.fullmatch(name):
        return f"adapter name {name!r} is invalid: use 1-64 ASCII letters, digits, '_' or '-'"
    if name in RESERVED:
        return f"adapter name {name!r} is reserved (an attribute of torch's ModuleDict, which holds adapters)"
    return None


def check_name(name, where: str = "") -> str:
    """``name`` if it is a valid adapter name, else AdapterNameError (prefixed by ``where``)."""
    problem = name_problem(name)
    if problem:
        raise AdapterNameError(f"{where}: {problem}" if where else problem)
    return name


def safe_name(text: str, fallback: str = "default") -> str:
    """An adapter name made from free text (a folder name): invalid characters become
    ``_``; ``fallback`` when nothing valid is left."""
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", str(text))[:64]
    return fallback if name_problem(name) else name
