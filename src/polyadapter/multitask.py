"""Many adapters at once: K adapters for K tasks trained in one run over one frozen
base, as mixed batches — each step puts every task's rows into one batch, each row runs
its own adapter (``adapter_names``), and the loss is the sum of the tasks' mean losses,
so each adapter's gradient is exactly the one it would get trained alone on its rows
(other tasks' rows never reach it).

    from polyadapter.multitask import train_many
    metrics = train_many(pm, {"sentiment": ("sent", sent_rows), "topic": ("topic", topic_rows)},
                         steps=200, batch_size=8, loss="classification", lr=1e-3)

Rows are encoded examples (see ``polyadapter.batches``). Each adapter has its own
optimizer (AdamW or SGD; ``lr`` per task if wanted) and, with ``clip``, its own gradient
clipping, so a run equals K separate runs with the same data order
(``batches.order(len(rows), batch_size, steps, seed)`` per task) — at the cost of one
forward and backward per step instead of K.
"""
from __future__ import annotations

import time

import torch

from .batches import collate, logits_of, loss_sum, order
from .errors import ConfigError

OPTIMIZERS = ("adamw", "sgd")


def _per_task(value, tasks, what: str) -> dict:
    if isinstance(value, dict):
        missing = [t for t in tasks if t not in value]
        if missing:
            raise ConfigError(f"{what}: no value for task {missing[0]!r}")
        return {t: value[t] for t in tasks}
    return {t: value for t in tasks}


def _optimizer(kind, params, lr: float):
    if callable(kind):
        return kind(params, lr)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ConfigError(f"unknown optimizer {kind!r}; choose one of {OPTIMIZERS} or pass a function (params, lr)")


def train_many(pm, tasks: dict[str, tuple[str, list[dict]]], *, steps: int, batch_size: int | dict = 8,
               loss: str = "classification", optimizer="adamw", lr: float | dict = 1e-3,
               clip: float | None = None, seed: int = 0, pad_id: int = 0) -> dict:
    """Train one adapter per task of ``tasks`` (task -> (adapter name, rows)) for
    ``steps`` steps of mixed batches: ``batch_size`` rows of every task per step (an int,
    or one per task), in each task's own seeded order. ``loss``: ``"classification"`` or
    ``"causal-lm"``; ``optimizer``: ``"adamw"``, ``"sgd"`` or a function ``(params, lr)``
    making one, one per adapter. Only the named adapters change; the base and every other
    adapter stay bit-identical. Returns each task's mean loss per step."""
    if not tasks:
        raise ConfigError("train_many: no tasks")
    names = {t: spec[0] for t, spec in tasks.items()}
    if len(set(names.values())) != len(names):
        raise ConfigError(f"train_many: every task needs its own adapter; found {names}")
    for t, name in names.items():
        pm.record(name)
        if pm.is_merged(name):
            raise ConfigError(f"task {t!r}: adapter {name!r} is merged into the base; unmerge it first")
        if not tasks[t][1]:
            raise ConfigError(f"task {t!r}: no rows")
    sizes = _per_task(batch_size, tasks, "batch_size")
    rates = _per_task(lr, tasks, "lr")
    orders = {t: order(len(tasks[t][1]), sizes[t], steps, seed) for t in tasks}

    for p in pm.parameters():
        p.requires_grad_(False)
    params = {t: list(pm.adapter_parameters(names[t]).values()) for t in tasks}
    for ps in params.values():
        for p in ps:
            p.requires_grad_(True)
    opts = {t: _optimizer(optimizer, params[t], rates[t]) for t in tasks}
    device = next(pm.parameters()).device
    losses: dict[str, list[float]] = {t: [] for t in tasks}
    start = time.perf_counter()
    pm.train()
    try:
        for s in range(steps):
            rows, setups, spans = [], [], {}
            for t, (name, data) in tasks.items():
                chunk = [data[i] for i in orders[t][s * sizes[t]:(s + 1) * sizes[t]]]
                spans[t] = slice(len(rows), len(rows) + len(chunk))
                rows += chunk
                setups += [name] * len(chunk)
            batch = {k: v.to(device) for k, v in collate(rows, pad_id=pad_id).items()}
            labels = batch.pop("labels")
            logits = logits_of(pm(**batch, adapter_names=setups))
            total = 0.0
            for t, span in spans.items():
                part, count = loss_sum(logits[span], labels[span], loss)
                mean = part / max(count, 1)
                total = total + mean
                losses[t].append(float(mean.detach()))
            total.backward()
            for t in tasks:
                if clip:
                    torch.nn.utils.clip_grad_norm_(params[t], clip)
                opts[t].step()
                opts[t].zero_grad(set_to_none=True)
    finally:
        for ps in params.values():
            for p in ps:
                p.requires_grad_(False)
        pm.eval()
    seconds = round(time.perf_counter() - start, 3)
    for t, name in names.items():
        pm.record(name).provenance.update({"training": {
            "job": "train_many", "task": t, "tasks": len(tasks), "steps": steps, "batch_size": sizes[t],
            "lr": rates[t], "optimizer": optimizer if isinstance(optimizer, str) else "custom",
            "loss": loss, "seed": seed, "final_loss": losses[t][-1] if losses[t] else None}})
    return {"losses": losses, "steps": steps, "adapters": names, "rows_per_step": sum(sizes.values()),
            "seconds": seconds}
