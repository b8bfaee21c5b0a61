"""Triton kernels for mixed-adapter batches (same contract as ``torch_ops``).

One kernel, ``_gathered_mm``, does all the work. For row ``i`` of the batch it computes

    out[i] = [out[i] +] scale[s] * (x[i] @ W[s].T + bias[s]),   s = slot[i]

with x[i] of shape (L, k) and W[s] of shape (m, k). The launch grid is
``(cdiv(L, BLOCK_L) * cdiv(m, BLOCK_M), n)``: axis 1 is the row, axis 0 one
(BLOCK_L x BLOCK_M) output tile of that row (so at most 65535 rows per call, CUDA's
limit for grid axis 1). Each program instance reads its row's slot, then walks k in
BLOCK_K steps, multiplying an x tile (BLOCK_L x BLOCK_K) by the transposed tile of that
slot's weight (BLOCK_K x BLOCK_M) with ``tl.dot``, accumulating in float32. Bias, scale
and the existing ``out`` are applied to the accumulator once, and the tile is stored in
out's dtype. Every load and store is masked, so L, m and k need not be multiples of the
blocks (blocks are at least 16, as ``tl.dot`` requires). With L == 1 this is Punica's
BGMV (one token per row); with long rows it is SGMV with one segment per row. Tiles of
the same weight block are launched next to each other so that rows' L-tiles reuse it
from L2.

``gathered_linear`` is one launch. ``lora_delta`` is two: *shrink* ``h = scale * x @ A.T``
into an (n, L, r) buffer in x's dtype (as ``torch_ops`` rounds it), then *expand*
``out (+)= h @ B.T``.

One-token rows (the serving engine packs a step's tokens so, one row each) would fill one
row of every 16-row tile above. For them ``lora_delta`` runs ``_segment_mm`` instead:
rows with the same slot form one *segment* (the step plan orders rows by slot, so they
are consecutive; otherwise a token order read from ``torch_ops.segment_plan`` maps them),
the grid is ``(tiles of the longest segment x tiles of m, segments)``, and each program
multiplies up to BLOCK_T tokens of one segment by that segment's weight. The segments,
their slots and the longest one are worked out once per slot tensor (once per step for
all sites), not per site.

Tensors may have any strides (they are passed to the kernel). Float32 inputs use IEEE
fp32 dot products unless ``torch.backends.cuda.matmul.allow_tf32`` is set; float16 and
bfloat16 use the tensor cores. The output has x's dtype; banks of another dtype are cast
to it tile by tile.

These kernels are for inference: when grad mode is on and any input requires grad,
both functions fall back to ``torch_ops`` so that autograd works. Otherwise a given
``out`` is updated in place (and returned); it must not overlap ``x``.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import torch_ops

# Triton's interpreter (TRITON_INTERPRET=1, used by the CPU tests) runs tl.dot on the raw
# bit patterns of bfloat16 tiles (triton-lang/triton#11584); there, bf16 tiles are
# upcast to float32 before the dot. Compiled kernels use bf16 tl.dot directly.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _tile_dot(x_ptrs, w_ptrs, mask_rows, mask_m, K, sxk, swk,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_ROWS x BLOCK_M) float32 product of an x tile's rows and a weight's
    transposed tile, walking k in BLOCK_K steps (masked: K need not be a multiple)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_ROWS, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_rows[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_m[None, :], other=0.0).to(xt.dtype)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * sxk
        w_ptrs += BLOCK_K * swk
    return acc


@triton.jit
def _gathered_mm(
    x_ptr, w_ptr, slot_ptr, bias_ptr, scale_ptr, out_ptr,
    L, M, K,
    sxn, sxl, sxk,
    sws, swm, swk,
    sslot, sbs, sbm, sscale,
    son, sol, som,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(1).to(tl.int64)
    tiles_l = tl.cdiv(L, BLOCK_L)
    tile_l = tl.program_id(0) % tiles_l
    tile_m = tl.program_id(0) // tiles_l
    s = tl.load(slot_ptr + row * sslot).to(tl.int64)

    offs_l = tile_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    mask_l = offs_l < L
    mask_m = offs_m < M

    x_ptrs = x_ptr + row * sxn + offs_l[:, None] * sxl + offs_k[None, :] * sxk
    w_ptrs = w_ptr + s * sws + offs_k[:, None] * swk + offs_m[None, :] * swm   # W[s].T tile
    acc = _tile_dot(x_ptrs, w_ptrs, mask_l, mask_m, K, sxk, swk, UPCAST, PRECISION, BLOCK_L, BLOCK_M, BLOCK_K)

    if HAS_BIAS:
        b = tl.load(bias_ptr + s * sbs + offs_m * sbm, mask=mask_m, other=0.0)
        acc += b.to(tl.float32)[None, :]
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + s * sscale).to(tl.float32)
    out_ptrs = out_ptr + row * son + offs_l[:, None] * sol + offs_m[None, :] * som
    mask = mask_l[:, None] & mask_m[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_mm(
    x_ptr, w_ptr, ends_ptr, gslot_ptr, tok_ptr, scale_ptr, out_ptr,
    M, K, tiles_t,
    sxt, sxk, sws, swm, swk, sscale, sot, som,
    HAS_ORDER: tl.constexpr, HAS_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[t] = [out[t] +] scale[s] * x[t] @ W[s].T for the tokens t of segment
    ``program_id(1)``, whose slot is s = gslot[segment]; segments end at ``ends``."""
    g = tl.program_id(1)
    tile_t = tl.program_id(0) % tiles_t
    tile_m = tl.program_id(0) // tiles_t
    start = tl.load(ends_ptr + g - 1, mask=g > 0, other=0)
    end = tl.load(ends_ptr + g)
    first = start + tile_t * BLOCK_T
    if first < end:  # tiles past a shorter segment's end do nothing
        s = tl.load(gslot_ptr + g).to(tl.int64)
        offs_t = first + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        if HAS_ORDER:
            rows = tl.load(tok_ptr + offs_t, mask=mask_t, other=0).to(tl.int64)
        else:
            rows = offs_t.to(tl.int64)
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        x_ptrs = x_ptr + rows[:, None] * sxt + offs_k[None, :] * sxk
        w_ptrs = w_ptr + s * sws + offs_k[:, None] * swk + offs_m[None, :] * swm   # W[s].T tile
        acc = _tile_dot(x_ptrs, w_ptrs, mask_t, mask_m, K, sxk, swk, UPCAST, PRECISION, BLOCK_T, BLOCK_M, BLOCK_K)
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + s * sscale).to(tl.float32)
        out_ptrs = out_ptr + rows[:, None] * sot + offs_m[None, :] * som
        mask = mask_t[:, None] & mask_m[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block(size: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(size)))


def _launch(x, weight, slot, out, bias=None, scale=None, accumulate=False):
    """out[i] = [out[i] +] scale[slot[i]] * (x[i] @ weight[slot[i]].T + bias[slot[i]])."""
    n, L, K = x.shape
    M = weight.shape[1]
    if out.numel() == 0:
        return out
    block_l = _block(L, 64)
    block_m = _block(M, 128)
    block_k = _block(K, 32 if x.dtype == torch.float32 else 64)
    precision = _precision(x)
    grid = (triton.cdiv(L, block_l) * triton.cdiv(M, block_m), n)
    _gathered_mm[grid](
        x, weight, slot,
        bias if bias is not None else x, scale if scale is not None else x, out,
        L, M, K,
        *x.stride(), *weight.stride(),
        slot.stride(0),
        *(bias.stride() if bias is not None else (0, 0)),
        scale.stride(0) if scale is not None else 0,
        *out.stride(),
        HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, ACCUMULATE=accumulate,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16, PRECISION=precision,
        BLOCK_L=block_l, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=8 if block_l * block_m >= 64 * 128 else 4,
    )
    return out


def _precision(x) -> str:
    if x.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def segments(slot: torch.Tensor, banks: int) -> tuple:
    """(segment ends (int32), bank slot per segment, token order or None, longest segment)
    for one-token rows choosing among ``banks`` slots. Built from ``torch_ops.segment_plan``
    and cached with it on the slot tensor, so every site of a step shares one."""
    plans = slot.__dict__.setdefault("_polyadapter_segments", {})
    key = ("triton", banks, slot._version)
    if key not in plans:
        plan = torch_ops.segment_plan(slot, banks, 1)
        if isinstance(plan.pick, slice):
            gslot = torch.arange(plan.pick.start, plan.pick.stop, device=slot.device)
        elif plan.pick is None:
            gslot = torch.arange(banks, device=slot.device)
        else:
            gslot = plan.pick
        plans[key] = (plan.offs, gslot, plan.order, plan.longest)
    return plans[key]


def _launch_segments(x, weight, seg, out, scale=None, accumulate=False):
    """out[t] = [out[t] +] scale[s] * x[t] @ weight[s].T over the segments ``seg``
    (see ``segments``); x: (tokens, k), out: (tokens, m)."""
    ends, gslot, order, longest = seg
    K, M = x.shape[1], weight.shape[1]
    block_t = _block(longest, 64)
    block_m = _block(M, 128)
    block_k = _block(K, 32 if x.dtype == torch.float32 else 64)
    tiles_t = triton.cdiv(longest, block_t)
    grid = (tiles_t * triton.cdiv(M, block_m), ends.shape[0])
    _segment_mm[grid](
        x, weight, ends, gslot, order if order is not None else ends, scale if scale is not None else x, out,
        M, K, tiles_t,
        *x.stride(), *weight.stride(), scale.stride(0) if scale is not None else 0, *out.stride(),
        HAS_ORDER=order is not None, HAS_SCALE=scale is not None, ACCUMULATE=accumulate,
        UPCAST=_INTERPRET and x.dtype == torch.bfloat16, PRECISION=_precision(x),
        BLOCK_T=block_t, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    return out


def _needs_autograd(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def gathered_linear(x, weight, slot, bias=None, scale=None, out=None):
    """``out[i] (+)= scale[slot[i]] * (x[i] @ weight[slot[i]].T + bias[slot[i]])`` in one
    Triton launch. Falls back to ``torch_ops`` when autograd needs a graph."""
    if _needs_autograd(x, weight, bias, scale, out):
        return torch_ops.gathered_linear(x, weight, slot, bias=bias, scale=scale, out=out)
    n, L, _ = x.shape
    if out is None:
        out = x.new_empty((n, L, weight.shape[1]))
        return _launch(x, weight, slot, out, bias=bias, scale=scale)
    return _launch(x, weight, slot, out, bias=bias, scale=scale, accumulate=True)


def lora_delta(x, A, B, slot, scale, out=None, cache=None):
    """``out[i] (+)= scale[slot[i]] * x[i] @ A[slot[i]].T @ B[slot[i]].T`` in two Triton
    launches (shrink, expand). Falls back to ``torch_ops`` when autograd needs a graph."""
    if _needs_autograd(x, A, B, scale, out):
        return torch_ops.lora_delta(x, A, B, slot, scale, out=out, cache=cache)
    n, L, _ = x.shape
    if L == 1 and n > 1:  # one-token rows: packed segments, one slot per segment
        seg = segments(slot, A.shape[0])
        h = _launch_segments(x[:, 0], A, seg, x.new_empty((n, A.shape[1])), scale=scale)
        if out is None:
            return _launch_segments(h, B, seg, x.new_empty((n, B.shape[1]))).view(n, 1, -1)
        _launch_segments(h, B, seg, out[:, 0], accumulate=True)
        return out
    h = _launch(x, A, slot, x.new_empty((n, L, A.shape[1])), scale=scale)
    if out is None:
        return _launch(h, B, slot, x.new_empty((n, L, B.shape[1])))
    return _launch(h, B, slot, out, accumulate=True)
