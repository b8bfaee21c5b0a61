"""Pure-torch gathered matmuls, the reference implementation (see __init__).

Two strategies, chosen per call:

- *gather*: each row's weight is gathered from the bank, then one batched matmul runs
  every row at once. Differentiable; best for long rows with many distinct adapters.
- *segments* (SGMV): rows are sorted by slot and ``torch.nn.functional.grouped_mm``
  multiplies each run of rows by its adapter's weight, reading every adapter's weight
  once instead of copying it per row. Used for inference when rows are short (decode),
  where copying weights per row costs more than the matmuls themselves; for long rows
  (prefill) the gather path measured faster, even with a single adapter. Within it,
  rows over several slots whose runs are similar in length take the *padded* path
  (``_padded_into``): the rows are gathered into a (slots, longest run, in) block, padded
  with rows whose update is masked to zero, and two batched matmuls against the used
  range of slots do the rest; a handful of operators whatever the number of slots, where
  a matmul pair per slot costs each slot's dispatch.

Banks keep each slot's ``B`` transposed in memory (``B[s].t()`` is contiguous).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

_GROUPED = hasattr(F, "grouped_mm")
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rows per slot from which plain per-slot matmuls beat grouped_mm on CPU (measured at
# SmolLM2's widths, rank 16, 2 threads: one slot for 32 rows 66 vs 102 us, 8 slots for
# 300 rows 490 vs 765 us; 4 slots for 32 rows 183 vs 162 us).
_LOOP_ROWS = 24
# Rows per slot from which the in-place per-run path (rows already in slot order, see
# ``_runs_into``) beats grouped_mm: 6 slots for 16 rows 112-120 vs 141-215 us, 16 slots
# for 16 rows 155-202 vs 137-211 us (SmolLM2's widths, rank 16, 2 threads; noisy).
_FAST_ROWS = 2
# The padded path (``_padded_into``) runs while its padded block holds at most this many
# times the real tokens. At SmolLM2's widths, 2 threads, it took 86-217 us per site where
# per-slot matmuls or grouped_mm took 174-426 us (6-16 slots, 16-32 rows; ad-hoc timing).
_PADDED_WASTE = 4
# Tokens per row up to which the segment paths run; longer rows (prefill of a padded
# batch) measured faster on the gather path (bench/mixed_batch.py).
_SHORT_ROWS = 4


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


def lora_delta(x, A, B, slot, scale, out=None, cache=None):
    if _segments_pay(x, A, B, slot, out):
        return _lora_segments(x, A, B, slot, scale, out, cache)
    h = torch.bmm(x, A.index_select(0, slot).transpose(1, 2).to(x.dtype))            # (n, L, r)
    h = h * scale.index_select(0, slot).to(h.dtype)[:, None, None]
    b = B.index_select(0, slot).transpose(1, 2).to(h.dtype)                           # (n, r, out)
    if out is None:
        return torch.bmm(h, b)
    if torch.is_grad_enabled():
        return torch.baddbmm(out, h, b)
    return out.baddbmm_(h, b)


def _segments_pay(x, A, B, slot, out) -> bool:
    if not _GROUPED or x.device.type != "cpu" or x.dtype not in _GROUPED_DTYPES or x.shape[0] == 0:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad):
        return False  # grouped_mm has no CPU backward here; the gather path is differentiable
    if out is not None and not out.is_contiguous():
        return False
    size = x.element_size()  # grouped_mm needs every row stride to be a multiple of 16 bytes
    if any(d * size % 16 for d in (A.shape[1], A.shape[2], B.shape[1])):
        return False
    return x.shape[1] <= _SHORT_ROWS


class SegmentPlan(NamedTuple):
    """How one row-slot tensor's rows meet a bank (see :func:`segment_plan`)."""

    pick: object            # the used slots: a slice of the bank, their indices, or None (all)
    slot: torch.Tensor      # each row's group within ``pick``
    order: object           # rows sorted by group (None: already sorted)
    offs: torch.Tensor      # group end offsets in tokens (int32, for grouped_mm)
    longest: int            # tokens in the largest group
    tokens: object          # token order matching ``order`` (None: already sorted)
    runs: object            # ([(group, start, end)], per-run matmuls pay, in-place runs pay) or None
    padded: object          # (token index per padded place, (groups, longest, 1) real-token mask)
                            # when ``pick`` is a slice, else None


def segment_plan(slot: torch.Tensor, banks: int, L: int) -> SegmentPlan:
    """The plan of rows of ``L`` tokens choosing among ``banks`` slots. Host-side work
    (unique, argsort, bincount) done once per row-slot tensor and reused by every site
    that shares it: a mixed batch's row plan hands the same ``slot`` tensor to all sites
    of one structure, so this runs once per call rather than once per site."""
    plans = slot.__dict__.setdefault("_polyadapter_segments", {})
    key = (banks, L, slot._version)
    if key not in plans:
        used, slot_used = torch.unique(slot, return_inverse=True)
        lo, hi = int(used[0]), int(used[-1]) + 1
        if hi - lo <= 2 * used.numel():  # a slice of the bank (a view: no copy) with few empty groups
            pick, s, groups = slice(lo, hi), slot - lo, hi - lo
        elif used.numel() * 2 <= banks:  # grouped_mm runs one matmul per group, empty ones too
            pick, s, groups = used, slot_used, used.numel()
        else:
            pick, s, groups = None, slot, banks
        order = torch.argsort(s, stable=True)
        counts = torch.bincount(s, minlength=groups) * L                          # tokens per group
        offs, longest = counts.cumsum(0).to(torch.int32), int(counts.max())
        if bool((s[1:] >= s[:-1]).all()):  # rows already in slot order: no gather, no scatter
            order = tokens = None
        else:
            tokens = order if L == 1 else (order[:, None] * L + torch.arange(L, device=slot.device)).flatten()
        runs, rows, count = None, slot.shape[0] * L, used.numel()
        if count == 1 or rows >= min(_LOOP_ROWS, _FAST_ROWS) * count:  # few, long groups: mm each
            ends = offs.tolist()
            runs = [(g, a, b) for g, (a, b) in enumerate(zip([0] + ends[:-1], ends)) if b > a]
            loop = count == 1 or rows >= _LOOP_ROWS * count
            fast = tokens is None and (count == 1 or rows >= _FAST_ROWS * count)
            runs = (runs, loop, fast)
        padded = None
        if count > 1 and not isinstance(pick, torch.Tensor):
            padded = _padding(counts, longest, tokens)
        plans[key] = SegmentPlan(pick, s, order, offs, longest, tokens, runs, padded)
    return plans[key]


def _lora_segments(x, A, B, slot, scale, out, cache=None):
    n, L, _ = x.shape
    xs = x.reshape(n * L, -1)
    if out is not None and lora_add_(xs, out.view(n * L, -1), A, B, slot, scale, cache):
        return out
    pick, slot, order, offs, _, tokens, runs, _ = segment_plan(slot, A.shape[0], L)
    runs, loop, _ = runs or (None, False, False)
    if not loop:
        runs = None
    if isinstance(pick, slice):
        A, B, scale = A[pick], B[pick], scale[pick]
    elif pick is not None:
        A, B, scale = A.index_select(0, pick), B.index_select(0, pick), scale.index_select(0, pick)
    if tokens is not None:
        xs = xs.index_select(0, tokens)
    if runs is not None:
        d = _runs_matmul(xs, A, B, scale, runs)
    else:
        h = F.grouped_mm(xs, A.transpose(1, 2).to(x.dtype), offs=offs)                # (n*L, r), sorted
        row_scale = scale.index_select(0, slot if order is None else slot.index_select(0, order)).to(h.dtype)
        h = h * (row_scale if L == 1 else row_scale.repeat_interleave(L))[:, None]
        d = F.grouped_mm(h, B.transpose(1, 2).to(h.dtype), offs=offs)                 # (n*L, out), sorted
    if tokens is None:
        d = d.view(n, L, -1)
        if out is None:
            return d
        return out + d.to(out.dtype) if torch.is_grad_enabled() else out.add_(d.to(out.dtype))
    if out is None:
        return torch.empty_like(d).index_copy_(0, tokens, d).view(n, L, -1)
    flat = out.view(n * L, -1)
    if torch.is_grad_enabled():
        return flat.index_add(0, tokens, d.to(out.dtype)).view(out.shape)
    flat.index_add_(0, tokens, d.to(out.dtype))
    return out


def lora_add_(xs, out, A, B, slot, scale, cache=None) -> bool:
    """``out += LoRA(xs)`` in place for inference, on the two paths that need no sort of
    the tokens (rows in slot order, or a padded block); False, with ``out`` untouched,
    where neither applies (gradients, mixed dtypes, not CPU, long rows, used slots too
    scattered for a slice of the bank), and the caller takes :func:`lora_delta`.

    xs: (tokens, in) and out: (tokens, out), the tokens of ``slot.shape[0]`` rows of equal
    length; the rest as in :func:`lora_delta`. The serving engine's sites come here
    straight from the bank (``LoraPart.bank_forward``): the checks and the choice of
    path are a handful of comparisons, and the plan is the one cached on ``slot``."""
    if (torch.is_grad_enabled() or xs.device.type != "cpu" or not xs.dtype == A.dtype == B.dtype == out.dtype
            or slot.shape[0] == 0):
        return False
    tokens = xs.shape[0]
    L = tokens // slot.shape[0]
    if L > _SHORT_ROWS:
        return False
    plan = segment_plan(slot, A.shape[0], L)
    if isinstance(plan.pick, torch.Tensor):
        return False
    first = 0 if plan.pick is None else plan.pick.start
    if plan.padded is not None and plan.padded[0].shape[0] <= _PADDED_WASTE * tokens:
        _padded_into(xs, out, _views(cache, A, B, scale, ("range", first, plan.offs.shape[0])), plan.padded)
        return True
    if plan.runs is not None and plan.runs[2]:
        _runs_into(xs, out, A, B, scale, plan.runs[0], first, cache)
        return True
    return False


def _runs_matmul(xs, A, B, scale, runs):
    """The LoRA delta of sorted rows, one pair of plain matmuls per run of rows sharing a
    slot; faster than grouped_mm on CPU when runs are long (see ``_LOOP_ROWS``)."""
    if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == xs.shape[0]:  # one adapter for every row
        g = runs[0][0]
        h = torch.mm(xs, A[g].t().to(xs.dtype)).mul_(scale[g].to(xs.dtype))
        return torch.mm(h, B[g].t().to(h.dtype))
    d = xs.new_empty(xs.shape[0], B.shape[1])
    for g, a, b in runs:
        h = torch.mm(xs[a:b], A[g].t().to(xs.dtype)).mul_(scale[g].to(xs.dtype))
        torch.mm(h, B[g].t().to(h.dtype), out=d[a:b])
    return d


def _views(cache, A, B, scale, key) -> tuple:
    """Views of a bank for one slot (``key`` = ("slot", s): ``A_s.T``, ``B_s.T``,
    ``scale_s``) or for a range of slots (("range", first, count): ``A.T``, ``B.T`` and
    ``scale`` of slots ``first`` to ``first + count - 1``, batched). Kept in ``cache``
    when the caller passes the bank these tensors belong to (a dict that lives exactly
    as long as they do, and whose slots are rewritten in place, so the views stay true),
    else made afresh. Saves a few operator calls per site and step, which on CPU cost as
    much as the small matmuls themselves."""
    views = None if cache is None else cache.get(key)
    if views is None:
        if key[0] == "slot":
            views = (A[key[1]].t(), B[key[1]].t(), scale[key[1]])
        else:
            span = slice(key[1], key[1] + key[2])
            views = (A[span].transpose(1, 2), B[span].transpose(1, 2), scale[span, None, None])
        if cache is not None and cache.get("A") is A and cache.get("B") is B and cache.get("scale") is scale:
            cache[key] = views
    return views


def _runs_into(xs, out, A, B, scale, runs, first: int, cache=None) -> None:
    """Adds the LoRA delta of rows already in slot order to ``out`` in place: per run of
    one slot, ``out[run] += (x[run] @ A[slot].T * scale[slot]) @ B[slot].T`` as one
    ``mm``, one ``mul_`` and one ``addmm_`` on views of the bank (see ``_views``)."""
    if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == xs.shape[0]:  # one adapter for every row
        At, Bt, sc = _views(cache, A, B, scale, ("slot", first + runs[0][0]))
        out.addmm_(torch.mm(xs, At).mul_(sc), Bt)
        return
    for g, a, b in runs:
        At, Bt, sc = _views(cache, A, B, scale, ("slot", first + g))
        out[a:b].addmm_(torch.mm(xs[a:b], At).mul_(sc), Bt)


def _padding(counts: torch.Tensor, longest: int, tokens) -> tuple:
    """For the padded path: the token index of every place of a (groups, longest run)
    block (a group's tokens, then padding that points at token 0) and the mask of real
    places. Built once per plan from the tokens per group."""
    j = torch.arange(longest, device=counts.device)
    real = j[None, :] < counts[:, None]                                        # (groups, longest)
    place = torch.where(real, (counts.cumsum(0) - counts)[:, None] + j[None, :], 0).flatten()
    index = place if tokens is None else tokens.index_select(0, place)
    return index, real.unsqueeze(-1)


def _padded_into(xs, out, views, padded) -> None:
    """Adds the LoRA delta of the planned tokens to ``out`` in place: tokens gathered into
    one (groups, longest run, in) block, ``h = block @ A_g.T`` per group as one batched
    matmul, scaled per group and zeroed at the padding, ``out[token] += h @ B_g.T`` as one
    batched matmul and one index_add_ (padding adds zeros)."""
    At, Bt, sc = views
    index, real = padded
    groups, longest = real.shape[:2]
    h = torch.bmm(xs.index_select(0, index).view(groups, longest, -1), At)      # (groups, longest, r)
    h.mul_(real * sc.to(h.dtype))
    out.index_add_(0, index, torch.bmm(h, Bt).view(groups * longest, -1))
