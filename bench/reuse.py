"""Reusing adapters on real models and data: merging, compression and routing.

Three experiments, each printing one JSON line per result and written to
bench/out/reuse.md with plots:

1. merge (packaged MiniLM): a BBC News LoRA and a tweet-sentiment LoRA, each with its
   own classification head, are combined by every merging method; the combined body is
   evaluated on both tasks with each task's own head, relative to the task's own adapter.
2. compress (same adapters): storage ratio against accuracy retained for SVD rank
   reduction, ComPEFT and joint shared-basis compression.
3. route (packaged SmolLM2 + the chatterbot corpus): one LoRA per English category;
   held-out loss per category with Arrow routing over the whole library, against the
   right adapter chosen by hand (oracle), a uniform merge of all adapters and the base.

    python bench/reuse.py                 # everything (about 15 minutes on 2 CPU cores)
    python bench/reuse.py --only merge    # one part: merge | compress | route
    python bench/reuse.py --quick         # small smoke run
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import polyadapter as pa
from polyadapter.basemodels import load_classifier, load_smollm2
from polyadapter.causal_lm import as_messages, chat_text
from polyadapter.data import load_chatterbot, load_dataset, split
from polyadapter.ops.combine import combine
from polyadapter.ops.compress import compeft, svd_compress
from polyadapter.ops.lorahub import lorahub
from polyadapter.ops.shared_basis import compress_to_shared_basis
from polyadapter.training import evaluate, lm_loss, train_adapter, train_lm_adapter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import env_info, markdown_table, set_threads  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
TASKS = ("bbc", "tweets")


def emit(rows: list, **row) -> None:
    rows.append(row)
    print(json.dumps(row), flush=True)


# ====================================================================== 1+2: MiniLM
def train_tasks(args):
    """MiniLM with one LoRA (+ its own head) per task; returns pm, tokenizer, test splits."""
    base, tokenizer = load_classifier("minilm", num_labels=5, seed=args.seed)  # BBC has 5 labels, tweets 3
    pm = pa.AdapterModel(base)
    tests = {}
    for task in TASKS:
        train, test = split(load_dataset(task), test_size=args.test_size, train_size=args.train_size, seed=args.seed)
        tests[task] = test
        pm.add_adapter(task, pa.LoraConfig(r=8, alpha=16, targets=["query", "value"], modules_to_save=["classifier"]),
                       activate=False)
        train_adapter(pm, task, train, tokenizer, epochs=args.epochs, lr=5e-3, seed=args.seed,
                      progress=not args.no_progress)
    pm.eval()
    return pm, tokenizer, tests


def accuracy(pm, setup, tokenizer, test) -> float:
    pm.set_active(setup)
    return evaluate(pm, test, tokenizer, progress=False)["accuracy"]


MERGES = [  # label, method, weights, options
    ("heads only (no body adapter)", "cat", [0.0, 0.0], {}),
    ("linear (factor average)", "linear", [0.5, 0.5], {}),
    ("task arithmetic, λ=0.5", "task_arithmetic", [0.5, 0.5], {}),
    ("task arithmetic, λ=1", "task_arithmetic", [1.0, 1.0], {}),
    ("TIES, density 0.5", "ties", [1.0, 1.0], {"density": 0.5}),
    ("DARE linear, density 0.5", "dare_linear", [1.0, 1.0], {"density": 0.5, "seed": 0}),
    ("DARE TIES, density 0.5", "dare_ties", [1.0, 1.0], {"density": 0.5, "seed": 0}),
    ("SVD to rank 8", "svd", [1.0, 1.0], {"rank": 8}),
]


def run_merge(pm, tokenizer, tests, args, rows):
    own = {t: accuracy(pm, t, tokenizer, tests[t]) for t in TASKS}
    for t in TASKS:
        emit(rows, part="merge", method="own adapter", task=t, accuracy=own[t], relative=1.0)
    for label, method, weights, opts in MERGES:
        for t in TASKS:
            name = f"m-{t}"
            combine(pm, name, list(TASKS), weights, method, modules_from=t, **opts)
            acc = accuracy(pm, name, tokenizer, tests[t])
            emit(rows, part="merge", method=label, task=t, accuracy=acc, relative=acc / own[t])
            pm.remove_adapter(name)
    # LoraHub: weights searched on a few labelled examples of each task, no gradients.
    for t in TASKS:
        shots = split(tests[t], test_size=0.5, seed=args.seed + 1)[1]  # a disjoint half as the few examples
        few = [shots.texts[i] for i in range(min(args.shots, len(shots)))]
        labels = torch.tensor(shots.labels[:len(few)])
        enc = tokenizer(few, padding=True, truncation=True, max_length=128, return_tensors="pt")
        examples = [{**enc, "labels": labels}]
        name = f"hub-{t}"
        lorahub(pm, name, list(TASKS), examples, budget=args.budget, seed=args.seed, modules_from=t, progress=False)
        acc = accuracy(pm, name, tokenizer, tests[t])
        emit(rows, part="merge", method=f"LoraHub ({args.shots} examples)", task=t, accuracy=acc,
             relative=acc / own[t], weights=pm.record(name).provenance.get("weights"))
        pm.remove_adapter(name)
    return own


def run_compress(pm, tokenizer, tests, own, args, rows):
    def record(method, setting, task, name, ratio):
        acc = accuracy(pm, name, tokenizer, tests[task])
        emit(rows, part="compress", method=method, setting=setting, task=task, storage_ratio=ratio,
             accuracy=acc, relative=acc / own[task])

    for t in TASKS:
        for rank in (1, 2, 4):
            svd_compress(pm, t, "c", rank=rank)
            record("SVD", f"rank {rank}", t, "c", pm.record("c").provenance["storage_ratio"])
            pm.remove_adapter("c")
        for energy in (0.5, 0.8, 0.95):
            svd_compress(pm, t, "c", energy=energy)
            record("SVD", f"energy {energy}", t, "c", pm.record("c").provenance["storage_ratio"])
            pm.remove_adapter("c")
        for density in (0.05, 0.1, 0.2, 0.5):
            compeft(pm, t, "c", density=density)
            record("ComPEFT", f"density {density}", t, "c", pm.record("c").provenance["storage_ratio"])
            pm.remove_adapter("c")
    for k in (2, 4, 8, 16):
        summary = compress_to_shared_basis(pm, list(TASKS), "basis", rank=k, suffix="-jd")
        for t in TASKS:
            # the head copy stays with the source adapter: evaluate the compressed body under it
            record("shared basis (both adapters)", f"k={k}", t, pa.Stack(f"{t}-jd", _head_only(pm, t)),
                   summary["storage_ratio"])
        for t in TASKS:
            pm.remove_adapter(f"{t}-jd")
        pm.remove_adapter("basis")


def _head_only(pm, task):
    """An adapter holding only ``task``'s head: a zero-weight copy of it with its head."""
    name = f"head-{task}"
    if name not in pm.adapters:
        combine(pm, name, [task], [0.0], "cat", modules_from=task)
    return name


# ====================================================================== 3: SmolLM2 + chatterbot
def run_route(args, rows):
    model, tokenizer = load_smollm2()
    pm = pa.AdapterModel(model)
    cats = load_chatterbot(min_conversations=args.min_conversations)
    if args.quick:
        cats = dict(list(cats.items())[:3])
    rng = random.Random(args.seed)
    held = {}
    for cat, convs in cats.items():
        convs = list(convs)
        rng.shuffle(convs)
        n_test = max(8, min(25, len(convs) // 5))
        texts = [chat_text(tokenizer, as_messages(c)) for c in convs]  # loss on every token, as lm_loss scores
        held[cat] = texts[:n_test]
        pm.add_adapter(cat, pa.LoraConfig(r=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"]),
                       activate=False)
        train_lm_adapter(pm, cat, texts[n_test:n_test + args.lm_train], tokenizer, epochs=args.lm_epochs, lr=1e-3,
                         batch_size=8, max_length=160, seed=args.seed, progress=not args.no_progress)
    library = list(cats)
    combine(pm, "uniform", library, [1.0 / len(library)] * len(library), "cat")
    for k in (1, 2):
        pm.add_adapter(f"arrow{k}", {"method": "arrow", "library": library, "top_k": k}, activate=False)
    setups = {"base": None, "uniform merge": "uniform", "Arrow top-1": "arrow1", "Arrow top-2": "arrow2"}
    for cat in library:
        for label, setup in {**setups, "oracle (own adapter)": cat}.items():
            pm.set_active(setup)
            emit(rows, part="route", method=label, category=cat,
                 loss=lm_loss(pm, held[cat], tokenizer, batch_size=8, max_length=160))


# ====================================================================== report
def report(rows: list[dict], args, seconds: float) -> None:
    OUT.mkdir(exist_ok=True)
    lines = ["# Reusing adapters: merging, compression, routing", "",
             f"Environment: {json.dumps(env_info())}. Total {seconds:.0f} s. Settings: {vars(args)}.", ""]
    merge = [r for r in rows if r["part"] == "merge"]
    if merge:
        lines += ["## Merging a BBC News LoRA and a tweet-sentiment LoRA (MiniLM)", "",
                  "Each combined body is evaluated with each task's own head; relative = accuracy / that task's "
                  "own adapter's accuracy.", ""]
        methods = list(dict.fromkeys(r["method"] for r in merge))
        by = {(r["method"], r["task"]): r for r in merge}
        table = [[m] + [f"{by[(m, t)]['accuracy']:.3f} ({by[(m, t)]['relative']:.2f})" for t in TASKS]
                 for m in methods]
        lines += [markdown_table(["method", "BBC accuracy (relative)", "tweets accuracy (relative)"], table), "",
                  "![merging](reuse_merge.png)", ""]
        _plot_merge(merge, methods)
    comp = [r for r in rows if r["part"] == "compress"]
    if comp:
        lines += ["## Compression: storage ratio against accuracy retained", ""]
        table = [[r["method"], r["setting"], r["task"], f"{r['storage_ratio']:.1f}x", f"{r['accuracy']:.3f}",
                  f"{r['relative']:.2f}"] for r in comp]
        lines += [markdown_table(["method", "setting", "task", "storage ratio", "accuracy", "relative"], table), "",
                  "![compression](reuse_compress.png)", ""]
        _plot_compress(comp)
    route = [r for r in rows if r["part"] == "route"]
    if route:
        lines += ["## Routing over a library of chatterbot-category LoRAs (SmolLM2-135M)", "",
                  "Held-out next-token loss per category (lower is better).", ""]
        methods = list(dict.fromkeys(r["method"] for r in route))
        cats = list(dict.fromkeys(r["category"] for r in route))
        by = {(r["method"], r["category"]): r["loss"] for r in route}
        table = [[c] + [f"{by[(m, c)]:.3f}" for m in methods] for c in cats]
        table.append(["**mean**"] + [f"**{sum(by[(m, c)] for c in cats) / len(cats):.3f}**" for m in methods])
        lines += [markdown_table(["category"] + methods, table), "", "![routing](reuse_route.png)", ""]
        _plot_route(route, methods, cats)
    (OUT / "reuse.md").write_text("\n".join(lines))
    with open(OUT / "reuse.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _plot_merge(merge, methods):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    by = {(r["method"], r["task"]): r["relative"] for r in merge}
    width = 0.38
    for j, t in enumerate(TASKS):
        ax.barh([i + j * width for i in range(len(methods))], [by[(m, t)] for m in methods], height=width, label=t)
    ax.set_yticks([i + width / 2 for i in range(len(methods))], methods)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("accuracy relative to the task's own adapter")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "reuse_merge.png", dpi=120)


def _plot_compress(comp):
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(TASKS), figsize=(10, 4), sharey=True)
    for ax, t in zip(axes, TASKS):
        for method in dict.fromkeys(r["method"] for r in comp):
            pts = sorted((r["storage_ratio"], r["relative"]) for r in comp if r["task"] == t and r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log")
        ax.set_title(t)
        ax.set_xlabel("storage ratio (source bytes / compressed bytes)")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set_ylabel("accuracy relative to the uncompressed adapter")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "reuse_compress.png", dpi=120)


def _plot_route(route, methods, cats):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 4.5))
    by = {(r["method"], r["category"]): r["loss"] for r in route}
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        ax.bar([i + j * width for i in range(len(cats))], [by[(m, c)] for c in cats], width=width, label=m)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cats))], cats, rotation=30, ha="right")
    ax.set_ylabel("held-out loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "reuse_route.png", dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("merge", "compress", "route"), action="append")
    p.add_argument("--quick", action="store_true", help="small data and budgets: a smoke run")
    p.add_argument("--train-size", type=int, default=600)
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--shots", type=int, default=32, help="labelled examples LoraHub sees")
    p.add_argument("--budget", type=int, default=40, help="LoraHub objective evaluations")
    p.add_argument("--min-conversations", type=int, default=30, help="chatterbot categories at least this big")
    p.add_argument("--lm-train", type=int, default=120, help="training conversations per category (at most)")
    p.add_argument("--lm-epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.epochs, args.shots, args.budget = 80, 60, 1, 8, 6
        args.lm_train, args.lm_epochs = 16, 1
    set_threads(args.threads)
    parts = args.only or ["merge", "compress", "route"]
    rows: list[dict] = []
    start = time.perf_counter()
    if "merge" in parts or "compress" in parts:
        pm, tokenizer, tests = train_tasks(args)
        own = run_merge(pm, tokenizer, tests, args, rows) if "merge" in parts else \
            {t: accuracy(pm, t, tokenizer, tests[t]) for t in TASKS}
        if "compress" in parts:
            run_compress(pm, tokenizer, tests, own, args, rows)
    if "route" in parts:
        run_route(args, rows)
    report(rows, args, time.perf_counter() - start)
    print(f"wrote {OUT / 'reuse.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
