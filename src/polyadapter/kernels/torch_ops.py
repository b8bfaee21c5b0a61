"""Pure-torch gathered matmuls: each row's weight is gathered from the bank, then one
batched matmul runs every row at once. The reference implementation (see __init__)."""
from __future__ import annotations

import torch


def gathered_linear(x, weight, slot, bias=None, scale=None, out=None):
    w = weight.index_select(0, slot)                       # (n, m, k)
    if bias is not None:
        y = torch.baddbmm(bias.index_select(0, slot).unsqueeze(1).to(x.dtype), x, w.transpose(1, 2).to(x.dtype))
    else:
        y = torch.bmm(x, w.transpose(1, 2).to(x.dtype))
    if scale is not None:
        y = y * scale.index_select(0, slot).to(y.dtype)[:, None, None]
    if out is None:
        return y
    return out + y if torch.is_grad_enabled() else out.add_(y)


def lora_delta(x, A, B, slot, scale, out=None):
    h = torch.bmm(x, A.index_select(0, slot).transpose(1, 2).to(x.dtype))            # (n, L, r)
    h = h * scale.index_select(0, slot).to(h.dtype)[:, None, None]
    b = B.index_select(0, slot).transpose(1, 2).to(h.dtype)                           # (n, r, out)
    if out is None:
        return torch.bmm(h, b)
    if torch.is_grad_enabled():
        return torch.baddbmm(out, h, b)
    return out.baddbmm_(h, b)
