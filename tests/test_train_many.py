"""Many adapters at once (polyadapter.multitask.train_many): K adapters for K tasks in
one run over one frozen base as mixed batches. Each adapter equals training it alone with
the same data order and optimizer; other tasks' rows never reach it."""
from __future__ import annotations

import pytest
import torch
from conftest import make_model

import polyadapter as pa
from polyadapter.batches import collate, logits_of, loss_sum, order
from polyadapter.multitask import train_many

LM_ADAPTERS = {"a": pa.LoraConfig(r=4, targets=["q_proj", "v_proj"]),
               "b": pa.LoraConfig(r=2, targets=["q_proj", "v_proj"]),  # another rank: another bucket
               "c": pa.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])}


def llama_many():
    pm = pa.AdapterModel(make_model("llama"))  # no dropout in Llama
    torch.manual_seed(1)
    for name, cfg in LM_ADAPTERS.items():
        pm.add_adapter(name, cfg, activate=False)
    pm.add_adapter("idle", pa.LoraConfig(r=4, targets=["q_proj"]), activate=False)
    with torch.no_grad():  # IA3 starts at 1 and LoRA B at 0: move off the start so every tensor has gradient
        for name in pm.adapters:
            for p in pm.adapter_parameters(name).values():
                p.add_(0.05 * torch.randn_like(p))
    return pm


def bert_many():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    pm = pa.AdapterModel(BertForSequenceClassification(cfg).eval())
    for name in ("x", "y"):
        pm.add_adapter(name, pa.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]),
                       activate=False)
    return pm


def lm_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 100, (4 + (i * 5 + seed) % 7,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    return out


def cls_rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 100, (3 + i % 4,), generator=g).tolist() for i in range(n)]
    return [{"input_ids": r, "labels": int(r[0] % 3)} for r in rows]


def solo(pm, name, rows, *, steps, batch_size, loss, make_opt, lr, clip):
    """Train ``name`` alone: its own rows in the same order, mean loss, the same optimizer."""
    params = pm.train_adapter(name)
    opt = make_opt(params, lr)
    idx = order(len(rows), batch_size, steps, seed=0)
    for s in range(steps):
        batch = collate([rows[i] for i in idx[s * batch_size:(s + 1) * batch_size]])
        labels = batch.pop("labels")
        total, count = loss_sum(logits_of(pm(**batch)), labels, loss)
        (total / count).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad()
    for p in params:
        p.requires_grad_(False)


def state(pm, name):
    return {k: v.detach().clone() for k, v in pm.adapter_state_dict(name).items()}


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_each_adapter_equals_training_it_alone_causal_lm(optimizer):
    tasks = {"t_a": ("a", lm_rows(7, 1)), "t_b": ("b", lm_rows(5, 2)), "t_c": ("c", lm_rows(6, 3))}
    sizes = {"t_a": 2, "t_b": 3, "t_c": 2}
    lr = {"t_a": 1e-2, "t_b": 5e-3, "t_c": 1e-2} if optimizer == "adamw" else 0.5
    kw = dict(steps=4, loss="causal-lm", clip=1.0)
    pm = llama_many()
    start = {n: state(pm, n) for n in pm.adapters}
    base = {k: v.clone() for k, v in pm.model.state_dict().items() if ".adapters." not in k}
    metrics = train_many(pm, tasks, batch_size=sizes, optimizer=optimizer, lr=lr, **kw)
    assert set(metrics["losses"]) == set(tasks) and all(len(v) == 4 for v in metrics["losses"].values())
    make_opt = (lambda ps, r: torch.optim.AdamW(ps, lr=r)) if optimizer == "adamw" else \
        (lambda ps, r: torch.optim.SGD(ps, lr=r))
    for t, (name, rows) in tasks.items():
        alone = llama_many()
        solo(alone, name, rows, batch_size=sizes[t], make_opt=make_opt,
             lr=lr[t] if isinstance(lr, dict) else lr, **kw)
        got, want = state(pm, name), state(alone, name)
        assert max_diff(got, start[name]) > 1e-3  # it trained
        diff = max_diff(got, want)
        print(f"{optimizer} {name}: max |many - alone| = {diff:.2e}")
        assert diff < 1e-5, (name, diff)
    assert all(torch.equal(v, start["idle"][k]) for k, v in state(pm, "idle").items())  # untouched
    assert all(torch.equal(v, pm.model.state_dict()[k]) for k, v in base.items())  # the base too
    assert not any(p.requires_grad for p in pm.parameters())
    assert pm.record("b").provenance["training"]["job"] == "train_many"


def test_each_adapter_equals_training_it_alone_classification_with_heads():
    tasks = {"one": ("x", cls_rows(9, 1)), "two": ("y", cls_rows(8, 2))}
    kw = dict(steps=3, loss="classification", clip=None)
    pm = bert_many()
    train_many(pm, tasks, batch_size=3, optimizer="adamw", lr=1e-2, **kw)
    for t, (name, rows) in tasks.items():
        alone = bert_many()
        solo(alone, name, rows, batch_size=3, make_opt=lambda ps, r: torch.optim.AdamW(ps, lr=r), lr=1e-2, **kw)
        diff = max_diff(state(pm, name), state(alone, name))
        print(f"bert {name}: max |many - alone| = {diff:.2e}")
        assert diff < 1e-5, (name, diff)


def test_other_tasks_rows_never_reach_an_adapter():
    pm = llama_many()
    for name in LM_ADAPTERS:
        for p in pm.adapter_parameters(name).values():
            p.requires_grad_(True)
    pm.train()
    rows = lm_rows(6, 4)
    setups = ["a", "a", "b", "b", "c", "c"]
    batch = collate(rows)
    labels = batch.pop("labels")
    logits = logits_of(pm(**batch, adapter_names=setups))
    total, count = loss_sum(logits[2:], labels[2:], "causal-lm")  # rows of b and c only
    (total / count).backward()
    grads = {n: [p.grad for p in pm.adapter_parameters(n).values()] for n in LM_ADAPTERS}
    assert all(g is None or not g.any() for g in grads["a"])  # exactly zero from others' rows
    assert all(g is not None and g.abs().sum() > 0 for n in ("b", "c") for g in grads[n])


def test_refusals():
    pm = llama_many()
    with pytest.raises(pa.ConfigError, match="own adapter"):
        train_many(pm, {"p": ("a", lm_rows(2, 1)), "q": ("a", lm_rows(2, 2))}, steps=1, loss="causal-lm")
    with pytest.raises(pa.AdapterNameError):
        train_many(pm, {"p": ("nope", lm_rows(2, 1))}, steps=1, loss="causal-lm")
    with pytest.raises(pa.ConfigError, match="optimizer"):
        train_many(pm, {"p": ("a", lm_rows(2, 1))}, steps=1, loss="causal-lm", optimizer="lion")
