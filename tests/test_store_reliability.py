"""The adapter store under crashes and concurrent writers, with real processes.

Workers are forked from the test process (no new interpreter, so no 4 s import of
torch per start): each opens its own Store (its own SQLite connection; the parent holds
none across a fork) and writes what it committed to a log file with os.write, which
survives SIGKILL. Every loop is bounded in count and in time."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import numpy as np
import pytest
import torch
from conftest import MLP_TARGETS, make_model

import polyadapter as pa
from polyadapter.store import Store, blobs, native_meta

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

FORK = multiprocessing.get_context("fork")


def template():
    """(meta, tensors) of a tiny real LoRA adapter on TinyNet, and the model to check loads on."""
    pm = pa.AdapterModel(make_model("mlp"))
    pm.add_adapter("t", pa.LoraConfig(r=2, targets=MLP_TARGETS))
    rec = pm.record("t")
    tensors = {k: v.clone() for k, v in pm.adapter_state_dict("t").items()}
    meta = native_meta(name="t", config=rec.config.to_dict(), sites=rec.sites, saved_modules=[],
                       base_model=pm.state.base_fingerprint, provenance={"data": "synthetic"},
                       num_parameters=sum(t.numel() for t in tensors.values()))
    return meta, tensors


def random_like(tensors, rng):
    return {k: torch.from_numpy(rng.standard_normal(tuple(t.shape)).astype(np.float32)) for k, t in tensors.items()}


def log_lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# ---------------------------------------------------------------------- SIGKILL at random points
def _crash_worker(root, log, meta, tensors, known, seed):
    """Adds, removes and collects garbage until killed (bounded anyway)."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        rng = np.random.default_rng(seed)
        known = list(known)
        s = Store(root)
        for _ in range(5000):
            op = rng.random()
            if op < 0.7 or not known:
                parts = tensors if rng.random() < 0.2 else random_like(tensors, rng)  # some share a blob
                v = s.add_parts(meta, parts, f"n{rng.integers(4)}", tags=["crash"])
                os.write(fd, f"ADD {v.ref}\n".encode())
                known.append(v.ref)
            elif op < 0.88:
                ref = known.pop(int(rng.integers(len(known))))
                os.write(fd, f"RM {ref}\n".encode())   # before: once started, it may have committed
                s.remove(ref)
            else:
                s.gc()
    except BaseException as e:  # noqa: BLE001 (reported to the parent through the log)
        os.write(fd, f"ERR {type(e).__name__}: {e}\n".encode())
        os._exit(1)
    os._exit(0)


def test_sigkill_during_add_rm_gc_loses_nothing_committed(tmp_path):
    root = tmp_path / "store"
    Store.init(root).close()
    meta, tensors = template()
    log = tmp_path / "log"
    committed: set[str] = set()
    seen = 0
    delays = [0.03, 0.5, 0.08, 0.3, 0.15, 0.6, 0.05, 0.25, 0.4, 0.1, 0.7, 0.2, 0.12, 0.45, 0.35]
    start = time.monotonic()
    for cycle, delay in enumerate(delays):
        p = FORK.Process(target=_crash_worker, args=(root, log, meta, tensors, sorted(committed), cycle))
        p.start()
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL, f"cycle {cycle}: the worker ended by itself ({p.exitcode})"
        lines = log_lines(log)
        new, seen = lines[seen:], len(lines)
        assert not [ln for ln in new if ln.startswith("ERR")], new
        for ln in new:
            kind, ref = ln.split()
            (committed.add if kind == "ADD" else committed.discard)(ref)
        with Store(root) as s:                     # what a user opening the store right after sees
            report = s.verify()
            assert report.ok, (cycle, report.problems)
            stored = {v.ref for v in s.list()}
            assert committed <= stored, f"cycle {cycle}: committed versions lost: {sorted(committed - stored)}"
            for ref in committed:
                s.read(ref)                        # hash-checked and parsed
        assert time.monotonic() - start < 60
    adds = sum(ln.startswith("ADD") for ln in log_lines(log))
    assert adds >= 30, f"only {adds} adds happened: the kills did not interrupt real work"
    with Store(root) as s:
        model = pa.AdapterModel(make_model("mlp"))
        for ref in sorted(committed)[:15]:
            s.load_into(model, ref, name="x")
            model.remove_adapter("x")
        s.gc()
        report = s.verify()
        assert report.ok and report.unreferenced_blobs == 0 and report.stale_temp_files == 0
        assert not list((root / blobs.TMP).iterdir())


# ---------------------------------------------------------------------- concurrent writers
def _add_worker(root, log, meta, tensors, bait, worker, count):
    """``count`` adds to the shared name; every 5th, add the 'bait' tensors under a private
    name, read them back and remove them again, racing the gc worker."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        rng = np.random.default_rng(100 + worker)
        s = Store(root)
        for i in range(count):
            v = s.add_parts(meta, random_like(tensors, rng), "shared", tags=[f"w{worker}"])
            os.write(fd, f"ADD {v.ref}\n".encode())
            if i % 5 == 0:
                b = s.add_parts(meta, bait, f"bait{worker}")
                s.read(b.ref)                       # its blob must be there, whatever gc did meanwhile
                s.remove(b.ref)
    except BaseException as e:  # noqa: BLE001
        os.write(fd, f"ERR {type(e).__name__}: {e}\n".encode())
        os._exit(1)
    os._exit(0)


def _gc_worker(root, log, stop):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        s = Store(root)
        deadline = time.monotonic() + 60
        runs = 0
        while not os.path.exists(stop) and time.monotonic() < deadline:
            s.gc()
            runs += 1
            time.sleep(0.01)  # a gc in a tight loop would hold the write lock nearly always
        os.write(fd, f"GC {runs}\n".encode())
    except BaseException as e:  # noqa: BLE001
        os.write(fd, f"ERR {type(e).__name__}: {e}\n".encode())
        os._exit(1)
    os._exit(0)


def test_two_writers_400_versions_none_lost_while_gc_runs(tmp_path):
    root = tmp_path / "store"
    Store.init(root).close()
    meta, tensors = template()
    bait = random_like(tensors, np.random.default_rng(7))
    logs = [tmp_path / f"log{w}" for w in range(3)]
    stop = tmp_path / "stop"
    start = time.monotonic()
    writers = [FORK.Process(target=_add_worker, args=(root, logs[w], meta, tensors, bait, w, 200)) for w in range(2)]
    collector = FORK.Process(target=_gc_worker, args=(root, logs[2], stop))
    for p in (*writers, collector):
        p.start()
    for p in writers:
        p.join(90)
    stop.write_text("")
    collector.join(30)
    elapsed = time.monotonic() - start
    for p in (*writers, collector):
        if p.exitcode is None:
            p.kill()
    all_lines = [ln for log in logs for ln in log_lines(log)]
    assert not [ln for ln in all_lines if ln.startswith("ERR")], [ln for ln in all_lines if ln.startswith("ERR")]
    assert [p.exitcode for p in (*writers, collector)] == [0, 0, 0]
    added = [ln.split()[1] for ln in all_lines if ln.startswith("ADD")]
    gc_runs = int(next(ln.split()[1] for ln in all_lines if ln.startswith("GC")))
    assert len(added) == len(set(added)) == 400 and gc_runs > 0
    with Store(root) as s:
        shared = s.versions("shared")
        assert [v.version for v in shared] == list(range(1, 401))      # none lost, none numbered twice
        assert {v.ref for v in shared} == set(added)
        assert sorted(len(s.list(tag=f"w{w}")) for w in range(2)) == [200, 200]
        assert s.list(name="bait0") == [] and s.list(name="bait1") == []
        report = s.verify()
        assert report.ok and report.versions == 400 and report.blobs == 400
        model = pa.AdapterModel(make_model("mlp"))
        for v in random.Random(0).sample(shared, 10):
            s.load_into(model, v.ref, name="x")
            model.remove_adapter("x")
    assert elapsed < 60, f"took {elapsed:.1f} s"
