"""A cheap fingerprint of a base model: its structure and a sample of its weights.

The sample is the first and last values of each tensor, contiguous on purpose: a
strided sample would touch every page of a memory-mapped checkpoint and make the
whole file resident (about 84 MB of RSS on MiniLM, measured in bench/train_step.py)."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

_EDGE = 512  # values hashed from each end of every tensor


def fingerprint(named_params: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict:
    structure = hashlib.sha256()
    weights = hashlib.sha256()
    total = 0
    for name in sorted(named_params):
        t = named_params[name].detach()
        total += t.numel()
        structure.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.reshape(-1)
        for edge in (flat[:_EDGE], flat[-_EDGE:]):
            weights.update(edge.float().cpu().numpy().tobytes())
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "class": type(model).__name__ if model is not None else None,
        "num_parameters": total,
        "structure_sha256": structure.hexdigest()[:16],
        "weights_sha256": weights.hexdigest()[:16],
    }
