"""Shared helpers for the benchmarks in bench/: the packaged MiniLM, synthetic
batches, interleaved timing and peak-memory measurement.

Timing rule: every case of a benchmark runs in ONE process, interleaved round by
round (A B C A B C ...), and we report the median. On shared CPUs absolute seconds
drift with the load; ratios between cases timed side by side drift much less.

Memory rule: each case runs alone in a fresh subprocess, measured two ways:
- RSS: the libraries under test imported, the base model loaded and its weights paged
  in (transformers memory-maps the safetensors file, so weights nobody has read yet
  are not resident; a library that merely reads every weight would otherwise be
  charged for them), we take the resident set size as the baseline, reset the
  kernel's high-water mark (``echo 5 > /proc/self/clear_refs``), build the case
  (adapter, optimizer) and run its steps; the peak is ``VmHWM - baseline``. Where the
  high-water mark cannot be reset we fall back to ``ru_maxrss - baseline`` and say so.
  This is what the operating system sees, malloc slack included; it moves by a few
  MB from run to run.
- tensor bytes: then, on a second freshly loaded base, the same build and steps under
  ``torch.profiler`` with ``profile_memory=True``; replaying every CPU allocation and
  free in time order gives the peak of live tensor bytes allocated after the base was
  loaded. Exact and repeatable to the byte: the one to compare two methods by.
"""
from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"


# ---------------------------------------------------------------- environment
def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def env_info() -> dict:
    import transformers
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }
    try:
        import peft
        info["peft"] = peft.__version__
    except ImportError:
        pass
    try:
        info["loadavg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


# ---------------------------------------------------------------- model and data
def load_minilm(num_labels: int = 5, seed: int = 0):
    """The packaged MiniLM with a fresh classification head. The same ``seed`` gives
    bit-identical models (the head is the only randomly initialised part)."""
    from polyadapter.basemodels import load_classifier
    return load_classifier("minilm", num_labels=num_labels, seed=seed)[0]


def make_batch(batch: int, seq: int, vocab: int, num_labels: int = 5, seed: int = 0) -> dict:
    """Random token ids (no special tokens), full attention mask, random labels."""
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, vocab, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (batch,), generator=g),
    }


# ---------------------------------------------------------------- timing
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(cases: dict[str, Callable[[], object]], rounds: int, reps: int = 1,
                warmup: int = 1, clock: str = "wall") -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then ``rounds`` rounds in which each case runs
    ``reps`` times in turn (A..A B..B C..C, then again). Returns seconds per call.

    ``clock="cpu"`` measures this process's CPU time (all threads) instead of wall
    time: on a machine shared with other jobs it is far less disturbed by them, but it
    also counts OpenMP threads spinning at barriers, so quote it as a ratio only."""
    now = CLOCKS[clock]
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            gc.collect()
            for _ in range(reps):
                t0 = now()
                fn()
                times[name].append(now() - t0)
    return times


def summarize(samples: list[float]) -> dict:
    s = sorted(samples)
    q = lambda f: s[min(len(s) - 1, int(round(f * (len(s) - 1))))]  # noqa: E731
    return {"median_s": statistics.median(s), "p25_s": q(0.25), "p75_s": q(0.75),
            "min_s": s[0], "n": len(s)}


# ---------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@torch.no_grad()
def page_in(model: torch.nn.Module) -> None:
    """Read every parameter and buffer once, so memory-mapped weights are resident."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel():
            t.sum()


def rss_mb() -> float:
    kb = _status_kb("VmRSS")
    if kb is None:  # not Linux: only the peak is known
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def reset_peak() -> str:
    """Reset the kernel's RSS high-water mark; returns the method peak_mb() will use."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM after clear_refs reset"
    except OSError:
        return "ru_maxrss (peak since process start; includes model loading)"


def peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


def tensor_peak_mb(fn: Callable[[], object]) -> float:
    """Peak live CPU tensor bytes (MiB) allocated while ``fn()`` runs, over the start."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = {"CPU", "MKLDNN", "IDEEP"}
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and str(e.device_type()).split(".")[-1] in cpu]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def measure_in_subprocess(script: str, args: list[str], timeout: float = 600) -> dict:
    """Run ``python script *args`` and return the JSON object on its last stdout line."""
    try:
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": [f"timed out after {timeout:.0f} s"]}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"]}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": ["no JSON line in output"]}


# ---------------------------------------------------------------- reports
def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


# ---------------------------------------------------------------- timing with per-call setup
def interleaved_prepared(cases: dict[str, tuple[Callable[[], object] | None, Callable[[], object]]],
                         rounds: int, reps: int = 1, warmup: int = 1, clock: str = "wall",
                         sync: Callable[[], object] | None = None) -> dict[str, list[float]]:
    """:func:`interleaved` for cases given as ``(prepare, fn)``: ``prepare()`` (may be
    None) runs untimed before every call of ``fn()`` — e.g. to crop a KV cache back to
    its prefix — and ``sync()`` (e.g. ``torch.cuda.synchronize``) runs before the clock
    starts and before it stops, so queued GPU work is neither missed nor charged to the
    next case. Returns seconds per call of ``fn``."""
    now = CLOCKS[clock]
    wait = sync or (lambda: None)
    for prepare, fn in cases.values():
        for _ in range(warmup):
            if prepare is not None:
                prepare()
            fn()
    wait()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, (prepare, fn) in cases.items():
            gc.collect()
            for _ in range(reps):
                if prepare is not None:
                    prepare()
                wait()
                t0 = now()
                fn()
                wait()
                times[name].append(now() - t0)
    return times
