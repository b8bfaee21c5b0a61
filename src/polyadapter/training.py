"""A plain training loop for text classifiers: an adapter on a frozen base
(:func:`train_adapter`), or every weight of the base (:func:`train_full`, the baseline
adapters are measured against), and :func:`evaluate`; for causal language models
:func:`train_lm_adapter` and :func:`lm_loss`.

    metrics = train_adapter(pm, "topic", train, tokenizer, epochs=1, lr=2e-3)
    print(evaluate(pm, test, tokenizer)["accuracy"])

Texts are tokenized once; batches are padded to their longest row. Shuffling, dropout
and the head's initialisation follow ``seed``.

Run as several processes (``polyadapter train --processes N``, or ``accelerate launch
--multi_gpu --num_processes N`` / ``torchrun`` of a script calling these), both training
loops are data parallel: the model runs under DDP over the adapter's parameters only,
each process takes its share of every batch (``batch_size`` stays the global batch) and
the loss is scaled so the averaged gradient is the global batch's (polyadapter.distributed).
Dropout draws differ between processes, so with dropout on, a run is not bit-equal to a
one-process run.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataError, TextDataset
from .distributed import launched


def _tokenize(data: TextDataset, tokenizer, max_length: int) -> list[dict]:
    enc = tokenizer(list(data.texts), truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: enc[k][i] for k in keys} for i in range(len(data))]


def _batch(rows: list[dict], labels: list[int], tokenizer, device) -> tuple[dict, torch.Tensor]:
    inputs = tokenizer.pad(rows, return_tensors="pt")
    return ({k: v.to(device) for k, v in inputs.items()},
            torch.tensor(labels, dtype=torch.long, device=device))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def fit(model: nn.Module, params: list[nn.Parameter], train: TextDataset, tokenizer, epochs: int = 1,
        lr: float = 2e-3, batch_size: int = 16, max_length: int = 128, seed: int = 0, progress: bool = True,
        weight_decay: float = 0.0, warmup: float = 0.1, desc: str = "train") -> dict:
    """Train ``params`` of ``model`` with AdamW and cross-entropy; return metrics.

    The learning rate warms up over the first ``warmup`` share of steps, then decays
    linearly to zero. Gradients are clipped to norm 1.
    """
    from tqdm.auto import tqdm

    if len(train) == 0:
        raise DataError(f"{train.name or 'data'}: cannot train on an empty data set")
    replicas = launched()  # None in one process
    net = replicas.wrap(model) if replicas else model
    device = _device(model)
    rows = _tokenize(train, tokenizer, max_length)
    steps_per_epoch = math.ceil(len(rows) / batch_size)
    total = steps_per_epoch * epochs
    warm = max(1, int(warmup * total)) if warmup > 0 else 0
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    losses, start = [], time.perf_counter()
    bar = tqdm(total=total, desc=desc, disable=not progress or bool(replicas and not replicas.main), unit="step",
               dynamic_ncols=True)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator).tolist()
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            if replicas is None:
                inputs, labels = _batch([rows[i] for i in idx], [train.labels[i] for i in idx], tokenizer, device)
                loss = F.cross_entropy(_logits(model, inputs).float(), labels)
            else:  # this process's rows; DDP averages, so scale the sum to the global batch's mean
                mine, weight = replicas.rows(idx)
                inputs, labels = _batch([rows[i] for i in mine], [train.labels[i] for i in mine], tokenizer, device)
                loss = F.cross_entropy(_logits(net, inputs).float(), labels, reduction="sum") * (
                    weight * replicas.world / len(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item() if replicas is None else replicas.mean(loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    return {
        "train_size": len(train), "epochs": epochs, "steps": total, "lr": lr, "batch_size": batch_size,
        "max_length": max_length, "seed": seed, "weight_decay": weight_decay,
        **({"processes": replicas.world} if replicas else {}),
        "train_loss": sum(losses[-steps_per_epoch:]) / len(losses[-steps_per_epoch:]),
        "train_seconds": round(time.perf_counter() - start, 2),
    }


def train_adapter(pm, name: str, train: TextDataset, tokenizer, epochs: int = 1, lr: float = 2e-3,
                  batch_size: int = 16, max_length: int = 128, seed: int = 0, progress: bool = True,
                  weight_decay: float = 0.0, eval_split: TextDataset | None = None) -> dict:
    """Train adapter ``name`` of the AdapterModel ``pm``; nothing else changes (the
    optimizer sees only the adapter's parameters). With ``eval_split`` the metrics
    include test accuracy. The metrics are recorded in the adapter's provenance."""
    params = pm.train_adapter(name)
    metrics = fit(pm, params, train, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size,
                  max_length=max_length, seed=seed, progress=progress, weight_decay=weight_decay,
                  desc=f"train {name}")
    if eval_split is not None:
        result = evaluate(pm, eval_split, tokenizer, max_length=max_length, progress=progress)
        metrics.update({f"test_{k}": v for k, v in result.items()})
    for p in params:
        p.requires_grad_(False)
    pm.record(name).provenance.update({
        "data": train.name,
        "label_names": list(train.label_names),
        "training": {k: v for k, v in metrics.items() if not k.startswith("test_")},
        "metrics": {k: v for k, v in metrics.items() if k.startswith("test_") or k == "train_loss"},
    })
    return metrics


def train_full(model: nn.Module, train: TextDataset, tokenizer, epochs: int = 1, lr: float = 5e-5,
               batch_size: int = 16, max_length: int = 128, seed: int = 0, progress: bool = True,
               weight_decay: float = 0.01) -> dict:
    """Full fine-tuning: every parameter of ``model`` trains (no adapter)."""
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    metrics = fit(model, params, train, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size,
                  max_length=max_length, seed=seed, progress=progress, weight_decay=weight_decay,
                  desc="train full")
    metrics["trainable_parameters"] = sum(p.numel() for p in params)
    return metrics


@torch.inference_mode()
def evaluate(model: nn.Module, data: TextDataset, tokenizer, batch_size: int = 32, max_length: int = 128,
             progress: bool = True) -> dict:
    """Accuracy and mean cross-entropy of ``model`` (an AdapterModel with its active
    setup, or any classifier) on ``data``."""
    from tqdm.auto import tqdm

    if len(data) == 0:
        raise DataError(f"{data.name or 'data'}: cannot evaluate on an empty data set")
    was_training = model.training
    model.eval()
    device = _device(model)
    rows = _tokenize(data, tokenizer, max_length)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # less padding
    correct, loss_sum = 0, 0.0
    for b in tqdm(range(0, len(order), batch_size), desc="eval", disable=not progress, unit="batch",
                  dynamic_ncols=True):
        idx = order[b:b + batch_size]
        inputs, labels = _batch([rows[i] for i in idx], [data.labels[i] for i in idx], tokenizer, device)
        logits = _logits(model, inputs).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    return {"accuracy": correct / len(data), "loss": loss_sum / len(data), "n": len(data)}


# ---------------------------------------------------------------------- causal language models
# An example is a text (loss on every real token) or an encoded row ``{"input_ids",
# "labels"}`` with -100 where no loss falls (polyadapter.causal_lm.encode_chat: answers only).
def _lm_batches(examples: list, tokenizer, batch_size: int, max_length: int, device):
    """Padded batches of ``input_ids``, ``attention_mask`` and ``labels`` (-100 over padding)."""
    for b in range(0, len(examples), batch_size):
        chunk = examples[b:b + batch_size]
        if all(isinstance(x, str) for x in chunk):
            enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            labels = ids.masked_fill(mask == 0, -100)
        else:
            ids, mask, labels = _pad_rows(chunk, tokenizer, max_length)
        yield {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def _pad_rows(rows: list[dict], tokenizer, max_length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(min(len(r["input_ids"]), max_length) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = min(len(r["input_ids"]), max_length)
        ids[i, :n] = torch.tensor(r["input_ids"][:n])
        labels[i, :n] = torch.tensor(r["labels"][:n])
        mask[i, :n] = 1
    return ids, mask, labels


def train_lm_adapter(pm, name: str, texts: list, tokenizer, epochs: int = 1, lr: float = 1e-3,
                     batch_size: int = 8, max_length: int = 128, seed: int = 0, progress: bool = True,
                     steps: int | None = None) -> dict:
    """Train adapter ``name`` of a causal LM with AdamW (next-token loss on every real
    token of a text, or on the labelled tokens of an encoded row); nothing else changes.
    ``steps``: that many batches (reshuffling at each pass), instead of ``epochs`` passes.
    Returns (and records in the provenance) the metrics."""
    from tqdm.auto import tqdm

    if not texts:
        raise DataError(f"adapter {name!r}: cannot train on no texts")
    per_epoch = math.ceil(len(texts) / batch_size)
    total = steps if steps is not None else epochs * per_epoch
    params = pm.train_adapter(name)
    replicas = launched()  # None in one process
    net = replicas.wrap(pm) if replicas else pm
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr)
    losses, start = [], time.perf_counter()
    bar = tqdm(total=total, desc=f"train {name}", disable=not progress or bool(replicas and not replicas.main),
               unit="step", dynamic_ncols=True)
    while len(losses) < total:
        order = torch.randperm(len(texts), generator=gen).tolist()
        for batch in _lm_batches([texts[i] for i in order], tokenizer, batch_size, max_length, _device(pm)):
            loss = pm(**batch).loss if replicas is None else _replica_lm_loss(net, batch, replicas)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(loss.item() if replicas is None else replicas.mean(loss.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if len(losses) == total:
                break
    bar.close()
    for p in params:
        p.requires_grad_(False)
    pm.eval()
    metrics = {"train_loss": sum(losses[-10:]) / len(losses[-10:]), "first_loss": losses[0], "steps": len(losses),
               "seconds": time.perf_counter() - start, "examples": len(texts),
               "epochs": epochs if steps is None else round(total / per_epoch, 2),
               "lr": lr, "batch_size": batch_size, "max_length": max_length, "seed": seed,
               **({"processes": replicas.world} if replicas else {})}
    pm.record(name).provenance.update({"training": metrics})
    return metrics


def _replica_lm_loss(net: nn.Module, batch: dict, replicas) -> torch.Tensor:
    """This process's share of a global batch's token loss, scaled so that DDP's average
    of the gradients is the gradient of the global batch's token-mean loss."""
    from .batches import logits_of, loss_sum
    count = int((batch["labels"][:, 1:] != -100).sum())
    mine, weight = replicas.rows(list(range(batch["input_ids"].shape[0])))
    sub = {k: v[mine] for k, v in batch.items()}
    labels = sub.pop("labels")
    total, _ = loss_sum(logits_of(net(**sub)), labels, "causal-lm")
    return total * (weight * replicas.world / max(count, 1))


@torch.inference_mode()
def lm_loss(model: nn.Module, texts: list, tokenizer, batch_size: int = 8, max_length: int = 128) -> float:
    """Mean next-token cross-entropy over every real token of ``texts`` (token-weighted;
    over the labelled tokens of encoded rows)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in _lm_batches(texts, tokenizer, batch_size, max_length, _device(model)):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        target = batch["labels"][:, 1:]
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 ignore_index=-100, reduction="sum")
        total += losses.item()
        count += int((target != -100).sum())
    model.train(was_training)
    return total / max(count, 1)
