"""The plan of one engine step, built once from the scheduler's work and read by
every site, the attention layers, the embedding and the output layer.

The step's tokens are packed as ``tokens`` one-token rows (see ``kv_cache``): row
``i`` is one position of one request. So the mixed-batch machinery the library
already has applies unchanged, with one setup per row: a request's rows are
consecutive, so its adapter's rows form one segment of the segment (SGMV) kernels,
and the row plan (levels, buckets, bank slots) is computed here once per step for
all sites (``mixed.RowPlan`` caches per structure; ``kernels.segment_plan`` caches
the sort per slot tensor).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..mixed import RowPlan
from .kv_cache import AttentionPlan, PagedKV, Prefill
from .scheduler import Request, Work


@dataclass
class StepPlan:
    input_ids: torch.Tensor          # (tokens, 1)
    position_ids: torch.Tensor       # (tokens, 1)
    rows: RowPlan                    # one setup per packed row
    attention: AttentionPlan
    sampled: list[Request]           # requests drawing a token this step, in logits order
    sample_index: torch.Tensor       # their last rows
    sample_rows: RowPlan             # the row plan of just those rows (for an adapted output layer)
    prompt_rows: torch.Tensor | None     # rows holding prompt-tuning placeholders
    prompt_embeds: torch.Tensor | None   # what goes there

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


def build(work: list[Work], cache: PagedKV, block_size: int, device) -> StepPlan:
    device = torch.device(device)
    ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    setups: list = []
    decodes: list[tuple[int, Request, int]] = []   # (row, request, context length)
    prefills: list[Prefill] = []
    sampled, sample_at = [], []
    prompt_rows, prompt_parts = [], []
    row = 0
    for w in work:
        r = w.request
        ids.extend(r.tokens[w.start:w.start + w.count])
        pos = torch.arange(w.start, w.start + w.count)
        table = torch.tensor(r.blocks, dtype=torch.long)
        positions.append(pos)
        slots.append(table[pos // block_size] * block_size + pos % block_size)
        setups.extend([r.row_setup] * w.count)
        if w.count == 1 and w.start > 0:
            decodes.append((row, r, w.start + 1))
        elif w.start == 0:
            prefills.append(Prefill(row, row + w.count, None, None))
        else:
            end = w.start + w.count
            ctx = torch.arange(end)
            context = (table[ctx // block_size] * block_size + ctx % block_size).to(device)
            mask = (ctx[None, :] <= pos[:, None]).to(device)
            prefills.append(Prefill(row, row + w.count, context, mask))
        if w.start < r.prefix:  # prompt-tuning placeholders in this chunk
            stop = min(w.start + w.count, r.prefix)
            prompt_rows.append(torch.arange(row, row + stop - w.start))
            prompt_parts.append(r.prompt_embeds[w.start:stop])
        if w.samples:
            sampled.append(r)
            sample_at.append(row + w.count - 1)
        row += w.count
    slot_mapping = torch.cat(slots).to(device)
    decode_rows = decode_context = decode_mask = None
    if decodes:
        width = max(n for _, _, n in decodes)
        per = -(-width // block_size)
        table = torch.tensor([(r.blocks + [0] * per)[:per] for _, r, _ in decodes], dtype=torch.long)
        offsets = torch.arange(block_size)
        decode_context = (table[:, :, None] * block_size + offsets).reshape(len(decodes), -1)[:, :width].to(device)
        lengths = torch.tensor([n for _, _, n in decodes])
        decode_mask = (torch.arange(width)[None, :] < lengths[:, None]).view(len(decodes), 1, 1, width).to(device)
        decode_rows = torch.tensor([i for i, _, _ in decodes], dtype=torch.long, device=device)
    # The output layer runs on the rows that draw a token; a step of prefill chunks only
    # still hands it one row (its logits are dropped): an empty batch fits no model.
    logit_setups = [r.row_setup for r in sampled] or setups[:1]
    attention = AttentionPlan(cache, row, slot_mapping, decode_rows, decode_context, decode_mask, prefills)
    return StepPlan(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device)[:, None],
        position_ids=torch.cat(positions).to(device)[:, None],
        rows=RowPlan.build(setups, device),
        attention=attention,
        sampled=sampled,
        sample_index=torch.tensor(sample_at or [0], dtype=torch.long, device=device),
        sample_rows=RowPlan.build(logit_setups, device),
        prompt_rows=torch.cat(prompt_rows).to(device) if prompt_rows else None,
        prompt_embeds=torch.cat(prompt_parts).to(device) if prompt_parts else None,
    )
