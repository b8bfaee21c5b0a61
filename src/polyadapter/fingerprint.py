"""A cheap fingerprint of a base model: its structure and a sample of its weights."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

_SAMPLE = 1024


def fingerprint(named_params: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict:
    structure = hashlib.sha256()
    weights = hashlib.sha256()
    total = 0
    for name in sorted(named_params):
        t = named_params[name].detach()
        total += t.numel()
        structure.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        step = max(1, flat.numel() // _SAMPLE)
        weights.update(flat[::step][:_SAMPLE].float().cpu().numpy().tobytes())
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "class": type(model).__name__ if model is not None else None,
        "num_parameters": total,
        "structure_sha256": structure.hexdigest()[:16],
        "weights_sha256": weights.hexdigest()[:16],
    }
