"""Batched per-row ("gathered") matrix products for mixed-adapter batches.

Every row of a batch names a slot in a *bank*: the weights of all adapters of one
kind at one site, stacked along a leading dimension. One call computes, for every row
at once, that row's tokens times that row's adapter weight — Punica's BGMV (one token
per row) and SGMV (long segments) semantics — with no Python loop over adapters.

Two implementations with one contract:
- ``torch_ops``: pure torch, runs everywhere; the reference the CPU tests cover.
- ``triton_ops``: Triton kernels, used automatically for CUDA tensors when Triton is
  installed; tests check them against ``torch_ops`` (on a GPU when there is one, and
  on CPU through Triton's interpreter).

``POLYADAPTER_KERNELS=torch`` forces the torch path everywhere.
"""
from __future__ import annotations

import os

import torch

from . import torch_ops


def _triton_ops():
    try:
        from . import triton_ops
    except ImportError:  # Triton not installed: the torch path serves every device
        return None
    return triton_ops


def backend_for(x: torch.Tensor):
    """The implementation module used for tensors like ``x``."""
    if x.is_cuda and os.environ.get("POLYADAPTER_KERNELS", "auto") != "torch":
        ops = _triton_ops()
        if ops is not None:
            return ops
    return torch_ops


def gathered_linear(x, weight, slot, bias=None, scale=None, out=None):
    """``out[i] (+)= scale[slot[i]] * (x[i] @ weight[slot[i]].T + bias[slot[i]])``.

    x: (n, L, k); weight: (S, m, k); slot: (n,) int64 in [0, S); bias: (S, m) or None;
    scale: (S,) or None; out: (n, L, m) to add into (returned), or None for a new tensor.
    """
    return backend_for(x).gathered_linear(x, weight, slot, bias=bias, scale=scale, out=out)


def lora_delta(x, A, B, slot, scale, out=None, cache=None):
    """LoRA for every row: ``out[i] (+)= scale[slot[i]] * x[i] @ A[slot[i]].T @ B[slot[i]].T``.

    x: (n, L, in); A: (S, r, in); B: (S, out, r); slot: (n,); scale: (S,). ``cache``: the
    bank dict that holds A, B and scale, where the torch path keeps views of them."""
    return backend_for(x).lora_delta(x, A, B, slot, scale, out=out, cache=cache)


def lora_add_(xs, out, A, B, slot, scale, cache=None) -> bool:
    """``out += LoRA(xs)`` in place, for inference, where the torch path can do it without
    sorting tokens (see ``torch_ops.lora_add_``); False, ``out`` untouched, where it
    cannot (and on a device the Triton kernels serve): the caller takes :func:`lora_delta`.

    xs: (tokens, in); out: (tokens, out), contiguous; ``slot`` has one entry per row of
    equal length, the rest as in :func:`lora_delta`."""
    return backend_for(xs) is torch_ops and torch_ops.lora_add_(xs, out, A, B, slot, scale, cache)
