"""Accuracy of each method against full fine-tuning, on the packaged MiniLM.

Same data, same epochs, same seed for every method; each method has its own learning
rate (adapters want larger steps than full fine-tuning). Every run starts from the
same base weights and the same fresh classification head. Prints one JSON line per
(dataset, method) and writes bench/out/quality.md and bench/out/quality.png.

    python bench/quality.py                      # BBC News + tweets, all methods
    python bench/quality.py --quick              # a small smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import polyadapter as pa
from polyadapter.basemodels import load_classifier
from polyadapter.data import load_dataset, split
from polyadapter.training import evaluate, train_adapter, train_full

OUT = Path(__file__).resolve().parent / "out"

# method -> (config, learning rate). The classifier head trains with every method.
METHODS = {
    "lora": ({"method": "lora", "r": 8, "alpha": 16, "targets": ["query", "value"]}, 5e-3),
    "bottleneck": ({"method": "bottleneck", "placement": "pfeiffer", "reduction_factor": 16}, 5e-3),
    "ia3": ({"method": "ia3"}, 1e-2),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 20}, 3e-2),
    "sparse": ({"method": "sparse", "density": 0.01}, 5e-3),
    "full": (None, 1e-4),
}


def run(dataset: str, method: str, args) -> dict:
    data = load_dataset(dataset)
    train, test = split(data, test_size=args.test_size, train_size=args.train_size, seed=args.seed)
    base, tokenizer = load_classifier("minilm", num_labels=len(data.label_names), seed=args.seed)
    config, lr = METHODS[method]
    common = dict(epochs=args.epochs, lr=lr, batch_size=args.batch_size, max_length=args.max_length,
                  seed=args.seed, progress=not args.no_progress)
    start = time.perf_counter()
    if config is None:
        total = sum(p.numel() for p in base.parameters())
        train_full(base, train, tokenizer, **common)
        result = evaluate(base, test, tokenizer, max_length=args.max_length, progress=False)
        trainable = total
    else:
        pm = pa.AdapterModel(base)
        pm.add_adapter(method, {**config, "modules_to_save": ["classifier"]})
        train_adapter(pm, method, train, tokenizer, **common)
        result = evaluate(pm, test, tokenizer, max_length=args.max_length, progress=False)
        counts = pm.parameter_counts(method)
        trainable, total = counts["adapter"], counts["base"]
    return {
        "dataset": dataset, "method": method, "accuracy": round(result["accuracy"], 4),
        "trainable_parameters": trainable, "trainable_share": round(trainable / total, 5),
        "lr": lr, "epochs": args.epochs, "seed": args.seed, "train_size": len(train), "test_size": len(test),
        "seconds": round(time.perf_counter() - start, 1),
    }


def report(rows: list[dict]) -> str:
    datasets = sorted({r["dataset"] for r in rows})
    by = {(r["dataset"], r["method"]): r for r in rows}
    methods = [m for m in METHODS if any((d, m) in by for d in datasets)]
    head = "| method | trainable share | " + " | ".join(f"{d} accuracy | {d} vs full" for d in datasets) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(datasets))]
    for m in methods:
        share = next(by[(d, m)]["trainable_share"] for d in datasets if (d, m) in by)
        cells = []
        for d in datasets:
            r, full = by.get((d, m)), by.get((d, "full"))
            cells.append(f"{r['accuracy']:.3f}" if r else "—")
            cells.append(f"{r['accuracy'] / full['accuracy']:.2f}" if r and full else "—")
        lines.append(f"| {m} | {100 * share:.2f}% | " + " | ".join(cells) + " |")
    r0 = rows[0]
    lines.append("")
    lines.append(f"MiniLM-L6, {r0['train_size']} training / {r0['test_size']} held-out examples per data set, "
                 f"{r0['epochs']} epoch(s), seed {r0['seed']}; shares count the trained head.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        sub = [r for r in rows if r["dataset"] == d]
        ax.scatter([100 * r["trainable_share"] for r in sub], [r["accuracy"] for r in sub])
        for r in sub:
            ax.annotate(r["method"], (100 * r["trainable_share"], r["accuracy"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (% of base, log)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["bbc", "tweets"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--train-size", type=int, default=600)
    ap.add_argument("--test-size", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--quick", action="store_true", help="64 train / 64 test, 1 epoch, max length 64")
    args = ap.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.epochs, args.max_length = 64, 64, 1, 64
    torch.set_num_threads(args.threads)
    rows = []
    for dataset in args.datasets:
        for method in args.methods:
            row = run(dataset, method, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    OUT.mkdir(exist_ok=True)
    table = report(rows)
    (OUT / "quality.md").write_text(table + "\n")
    (OUT / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot(rows, OUT / "quality.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
