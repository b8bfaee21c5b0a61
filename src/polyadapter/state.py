"""The adapter state every Site reads: which adapters exist, the active setup, and
(during a mixed-batch call) every row's setup.

It lives on the model object (``AdapterModel.state``) and every Site holds a
reference to the same object, so a forward pass re-run by gradient checkpointing
during backward sees the same setup as the first pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AdapterRecord:
    name: str
    config: object                      # the method's config dataclass
    sites: list[str]                    # canonical site names holding a part of it
    saved_modules: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)


@dataclass
class AdapterState:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    setup: object = None                # the active setup: a name, a block tree or None
    active: tuple[str, ...] = ()        # every adapter name the setup uses
    base_fingerprint: dict = field(default_factory=dict)
    rows: object = None                 # the last call's RowPlan for a mixed batch, else None
    merged: set = field(default_factory=set)  # names of adapters merged into the base
    bank_slots: int | None = None       # set by the serving engine: banks with fixed slots (mixed.SlotBank)
    bank_epoch: int | None = None       # during an engine step: the adapters' version sum, else None
