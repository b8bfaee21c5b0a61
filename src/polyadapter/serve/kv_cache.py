"""Paged KV cache and the attention function that reads it.

Keys and values live in fixed-size *blocks* (``block_size`` token slots each) of one
flat tensor per layer, ``(num_blocks * block_size, kv_heads, head_dim)``. A request
owns a list of blocks (its block table), taken from a free list as its context grows
and returned the moment it finishes or is cancelled. No block is shared between
requests, so KV computed under one adapter can never be read under another.

How it plugs into Hugging Face models without per-architecture code: a step's tokens
are packed as a batch of one-token rows, ``input_ids`` of shape ``(tokens, 1)``, with
their true positions in ``position_ids``; the model runs with ``cache=None`` and
``config._attn_implementation`` set to :data:`ATTENTION` (registered with
transformers' public ``AttentionInterface``), so every attention layer hands its
freshly projected (and rotated) queries, keys and values to :func:`paged_attention`.
That function writes the keys and values into their slots and attends each token over
its own request's context: decode tokens in one batched ``scaled_dot_product_attention``
over their gathered blocks, each prefill chunk in one call of its own (causal within
the chunk). Because the name is not one of transformers' mask functions, the model
builds no mask of its own. Everything here touches only that public interface; the
pinned versions it is tested against are in the README.
"""
from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import PolyAdapterError, StateError

ATTENTION = "polyadapter_paged"


class OutOfBlocks(PolyAdapterError):
    """The KV cache has fewer free blocks than a request needs (the scheduler preempts)."""


class BlockAllocator:
    """Free list of KV block ids."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise PolyAdapterError(f"KV cache: num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"KV cache: {n} blocks wanted, {len(self._free)} free of {self.num_blocks}")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)


class PagedKV:
    """The per-layer key and value tensors. A layer's storage is allocated the first
    time the layer writes (its head count and width come from the model's own call),
    so nothing here needs to read architecture-specific config fields."""

    def __init__(self, num_blocks: int, block_size: int, dtype: torch.dtype, device):
        self.num_slots = num_blocks * block_size
        self.dtype, self.device = dtype, torch.device(device)
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._layer_of: dict[int, int] = {}   # id(attention module) -> layer index

    def layer(self, module, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = self._layer_of.get(id(module))
        if index is None:  # modules keep their order from the first step on
            index = self._layer_of[id(module)] = len(self._layer_of)
        kv = self.layers.get(index)
        if kv is None:
            shape = (self.num_slots, key.shape[1], key.shape[3])
            kv = self.layers[index] = (torch.zeros(shape, dtype=self.dtype, device=self.device),
                                       torch.zeros(shape, dtype=self.dtype, device=self.device))
        return kv

    def bytes_used(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.layers.values())


@dataclass
class Prefill:
    """One request's prompt chunk in a step: rows ``a:b`` of the packed batch."""

    a: int
    b: int
    context: torch.Tensor | None   # cache slots of every position up to the chunk's end; None: chunk starts at 0
    mask: torch.Tensor | None      # (chunk, context) True where a query may look


@dataclass
class AttentionPlan:
    """What :func:`paged_attention` needs for one step, built once by the step plan."""

    cache: PagedKV
    num_tokens: int
    slot_mapping: torch.Tensor            # (tokens,) cache slot each new key/value goes to
    decode_rows: torch.Tensor | None      # rows of one-token (decode) requests
    decode_context: torch.Tensor | None   # (decodes, longest context) cache slots
    decode_mask: torch.Tensor | None      # (decodes, 1, 1, longest context)
    prefills: list[Prefill]


_ACTIVE = threading.local()


class active_step:
    """Context manager: the attention plan every attention call of this thread reads."""

    def __init__(self, plan: AttentionPlan):
        self.plan = plan

    def __enter__(self):
        _ACTIVE.plan = self.plan

    def __exit__(self, *exc):
        _ACTIVE.plan = None


def paged_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """Transformers attention-function signature: ``query`` (tokens, heads, 1, dim),
    ``key``/``value`` (tokens, kv_heads, 1, dim). Returns (tokens, 1, heads, dim)."""
    plan: AttentionPlan | None = getattr(_ACTIVE, "plan", None)
    if plan is None:
        raise StateError(f"attention implementation {ATTENTION!r} runs only inside a serving-engine step")
    if kwargs.get("softcap") or kwargs.get("sliding_window") or kwargs.get("s_aux") is not None:
        raise PolyAdapterError("the serving engine's paged attention does not support soft-capping, sliding "
                               "windows or attention sinks yet; this model uses one of them")
    if query.shape[0] != plan.num_tokens or query.shape[2] != 1:
        raise StateError(f"paged attention got a batch of {tuple(query.shape[:3])} but the step packs "
                         f"{plan.num_tokens} one-token rows; a part that runs a whole attention block on a "
                         f"sub-batch (a module copy of a decoder layer) cannot serve yet")
    kc, vc = plan.cache.layer(module, key)
    k_new, v_new = key[:, :, 0, :], value[:, :, 0, :]
    kc.index_copy_(0, plan.slot_mapping, k_new.to(kc.dtype))
    vc.index_copy_(0, plan.slot_mapping, v_new.to(vc.dtype))
    q = query[:, :, 0, :]                                                       # (T, H, D)
    heads, kv_heads, dim = q.shape[1], kc.shape[1], q.shape[2]
    gqa = heads != kv_heads
    out = q.new_empty(plan.num_tokens, heads, dim)
    if plan.decode_rows is not None:
        n, width = plan.decode_context.shape
        flat = plan.decode_context.reshape(-1)
        k = kc.index_select(0, flat).view(n, width, kv_heads, dim).transpose(1, 2).to(q.dtype)
        v = vc.index_select(0, flat).view(n, width, kv_heads, dim).transpose(1, 2).to(q.dtype)
        qd = q.index_select(0, plan.decode_rows).unsqueeze(2)                     # (n, H, 1, D)
        o = F.scaled_dot_product_attention(qd, k, v, attn_mask=plan.decode_mask, scale=scaling, enable_gqa=gqa)
        out.index_copy_(0, plan.decode_rows, o[:, :, 0, :])
    for p in plan.prefills:
        qp = q[p.a:p.b].transpose(0, 1).unsqueeze(0)                              # (1, H, C, D)
        if p.context is None:  # the chunk is the whole context so far: plain causal attention
            k = k_new[p.a:p.b].transpose(0, 1).unsqueeze(0)
            v = v_new[p.a:p.b].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        else:
            k = kc.index_select(0, p.context).transpose(0, 1).unsqueeze(0).to(q.dtype)
            v = vc.index_select(0, p.context).transpose(0, 1).unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=p.mask, scale=scaling, enable_gqa=gqa)
        out[p.a:p.b] = o[0].transpose(0, 1)
    return out.unsqueeze(1), None


def register() -> None:
    """Register :func:`paged_attention` with transformers under :data:`ATTENTION`."""
    from transformers import AttentionInterface
    AttentionInterface.register(ATTENTION, paged_attention)
