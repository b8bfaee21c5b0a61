"""Encoded rows to padded batches, a fixed data order and summed losses: what the
distributed and the many-adapter training loops share (``distributed.py``, ``multitask.py``).

A row is a dict of an encoded example: ``input_ids`` (a list of ints; ``attention_mask``
and ``token_type_ids`` too if the model takes them), any other tensor input, and
``labels`` — an int (classification) or a list of ints with -100 where no loss falls
(causal LM; the model shifts nothing, :func:`loss_sum` does).

Losses are returned as (sum, count) so a caller can normalise by the count of a whole
global batch — the only way per-process or per-task pieces add up to exactly the loss
of one run over all of it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError

TASKS = ("classification", "causal-lm")
_PAD = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": -100}


def order(n: int, batch_size: int, steps: int, seed: int = 0) -> list[int]:
    """``steps * batch_size`` row indices: seeded permutations of ``range(n)`` one after
    another (a new one per pass), cut to length. Batch ``s`` is
    ``order[s * batch_size:(s + 1) * batch_size]``; a pass's tail joins the next pass."""
    if n <= 0:
        raise ConfigError("cannot train on no rows")
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while len(out) < steps * batch_size:
        out += torch.randperm(n, generator=g).tolist()
    return out[:steps * batch_size]


def collate(rows: list[dict], pad_id: int = 0) -> dict:
    """Pad a list of rows into one batch of tensors. Sequences (lists) are right-padded
    to the longest row: ``input_ids`` with ``pad_id``, masks with 0, labels with -100; an
    ``attention_mask`` is made when rows have none. Scalars and tensors are stacked."""
    if not rows:
        raise ConfigError("cannot make a batch of no rows")
    keys = list(rows[0])
    if any(list(r) != keys for r in rows):
        raise ConfigError(f"rows of one batch must have the same keys; found {keys} and others")
    if "input_ids" in keys and "attention_mask" not in keys:
        keys.append("attention_mask")
        rows = [{**r, "attention_mask": [1] * len(r["input_ids"])} for r in rows]
    out = {}
    for k in keys:
        values = [r[k] for r in rows]
        if isinstance(values[0], (list, tuple)):
            width = max(len(v) for v in values)
            fill = pad_id if _PAD.get(k, 0) is None else _PAD.get(k, 0)
            out[k] = torch.tensor([list(v) + [fill] * (width - len(v)) for v in values], dtype=torch.long)
        elif isinstance(values[0], torch.Tensor):
            out[k] = torch.stack(values)
        else:
            out[k] = torch.tensor(values)
    return out


def logits_of(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.logits


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: str) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy in float32, number of terms): over rows for
    ``"classification"``, over labelled next tokens (labels shifted by one) for
    ``"causal-lm"``."""
    if task == "classification":
        return F.cross_entropy(logits.float(), labels, reduction="sum"), labels.numel()
    if task == "causal-lm":
        target = labels[:, 1:]
        pred = logits[:, :-1].float()
        total = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=-100,
                                reduction="sum")
        return total, int((target != -100).sum())
    raise ConfigError(f"unknown task {task!r}; choose one of {TASKS}")
