"""Training-step and inference cost on the packaged MiniLM: polyadapter against PEFT
and against full fine-tuning, in one process with the cases interleaved.

Cases (batch 16 x seq 128 and 2 torch threads by default):
  full_ft          every parameter trainable, AdamW — the reference for training
  peft_lora        PEFT LoRA r=8 on query,value + classifier in modules_to_save
  poly_lora        polyadapter LoRA, same config, on an identically built base
  poly_bottleneck  polyadapter bottleneck (sequential, pfeiffer, reduction 16) + classifier
  infer_bare       bare base forward (eval, no_grad) — the reference for inference
  infer_peft_lora  PEFT, one unmerged LoRA active (eval, no_grad)
  infer_poly_lora  polyadapter, one unmerged LoRA active (eval, no_grad)
A training step is zero_grad + forward (with labels, so the loss) + backward + AdamW.

Timing: all cases built in this process, warmed up, then ``--rounds`` rounds in which
each case runs ``--reps`` times in turn; the median per case is reported.
Peak memory: each case re-runs this script with ``--case NAME`` in a fresh process
and reports the peak of live tensor bytes (torch profiler; exact) and the peak RSS
growth over the loaded, paged-in base (what the OS sees); see bench/common.py.

    python bench/train_step.py                    # full run (~3-5 min on 2 quiet cores)
    python bench/train_step.py --quick            # batch 4 x seq 32, 3 rounds: a smoke test
    python bench/train_step.py --cases poly_lora,peft_lora --mem none --rounds 20
    python bench/train_step.py --threads 1 --clock cpu   # steadier on a busy machine

Prints one JSON line per case, then a Markdown table; writes bench/out/train_step.md
and bench/out/train_step.png.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

TRAIN_CASES = ["full_ft", "peft_lora", "poly_lora", "poly_bottleneck"]
INFER_CASES = ["infer_bare", "infer_peft_lora", "infer_poly_lora"]
CASES = TRAIN_CASES + INFER_CASES
DESCRIPTION = {
    "full_ft": "full fine-tuning (all params, AdamW)",
    "peft_lora": "PEFT LoRA r=8 q,v + head",
    "poly_lora": "polyadapter LoRA r=8 q,v + head",
    "poly_bottleneck": "polyadapter bottleneck pfeiffer/16 + head",
    "infer_bare": "bare model forward",
    "infer_peft_lora": "PEFT, 1 unmerged LoRA",
    "infer_poly_lora": "polyadapter, 1 unmerged LoRA",
}
REFERENCE = {c: "full_ft" for c in TRAIN_CASES} | {c: "infer_bare" for c in INFER_CASES}
PEER = {"poly_lora": "peft_lora", "infer_poly_lora": "infer_peft_lora"}

R, ALPHA, TARGETS, HEAD = 8, 16, ["query", "value"], ["classifier"]
LR = 1e-4


# ---------------------------------------------------------------- building cases
def peft_lora(base):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    cfg = PeftLoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                         modules_to_save=HEAD)
    return get_peft_model(base, cfg)


def poly_lora(base):
    import polyadapter
    pm = polyadapter.AdapterModel(base)
    pm.add_adapter("a", polyadapter.LoraConfig(r=R, alpha=ALPHA, targets=TARGETS, modules_to_save=HEAD))
    return pm


def poly_bottleneck(base):
    import polyadapter
    pm = polyadapter.AdapterModel(base)
    pm.add_adapter("a", polyadapter.BottleneckConfig(mode="sequential", placement="pfeiffer",
                                                    reduction_factor=16, modules_to_save=HEAD))
    return pm


def build(case: str, base, batch: dict):
    """Turn a freshly loaded base into the case: (callable to time, trainable count, model)."""
    if case in TRAIN_CASES:
        if case == "full_ft":
            model = base
            params = [p for p in model.parameters()]
            for p in params:
                p.requires_grad_(True)
            model.train()
        elif case == "peft_lora":
            model = peft_lora(base)
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
        elif case == "poly_lora":
            model = poly_lora(base)
            params = model.train_adapter("a")
        else:
            model = poly_bottleneck(base)
            params = model.train_adapter("a")
        opt = torch.optim.AdamW(params, lr=LR)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            return loss

        return step, sum(p.numel() for p in params), model

    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if case == "infer_bare":
        model = base
    elif case == "infer_peft_lora":
        model = peft_lora(base)
    else:
        model = poly_lora(base)
    model.eval()
    _randomize_lora(model)  # a trained-looking adapter: B != 0 (costs the same either way)

    def forward():
        with torch.no_grad():
            return model(**inputs).logits

    return forward, 0, model


def _randomize_lora(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def check_lora_parity(peft_model, poly_model, inputs) -> float:
    """Copy PEFT's LoRA weights into polyadapter's and return max |logit difference|:
    the two inference cases must compute the same function."""
    peft_w = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for site, part in poly_model.parts("a").items():
            if not hasattr(part, "lora_A"):
                continue
            a = [p for n, p in peft_w.items() if f".{site}.lora_A." in n]
            b = [p for n, p in peft_w.items() if f".{site}.lora_B." in n]
            assert len(a) == 1 and len(b) == 1, (site, len(a), len(b))
            part.lora_A.copy_(a[0])
            part.lora_B.copy_(b[0])
        x = peft_model(**inputs).logits
        y = poly_model(**inputs).logits
    return (x - y).abs().max().item()


# ---------------------------------------------------------------- modes
def memory_case(args) -> dict:
    """One case alone in this (fresh) process: its build plus ``--mem-steps`` calls,
    measured as peak RSS growth over the loaded base and then, on a second freshly
    loaded base, as peak live tensor bytes from the profiler; see common.py."""
    import peft  # noqa: F401  imports are not the case's memory
    import polyadapter  # noqa: F401
    common.set_threads(args.threads)
    out = {"case": args.case}

    def run(base, batch):
        fn, _, _ = build(args.case, base, batch)
        for _ in range(args.mem_steps):  # >= 2 so the optimizer state exists at the peak
            fn()

    if args.mem in ("both", "rss"):  # first: RSS is the process's whole history
        base = common.load_minilm(seed=0)
        batch = common.make_batch(args.batch, args.seq, base.config.vocab_size)
        common.page_in(base)
        gc.collect()
        baseline = common.rss_mb()
        out["rss_method"] = common.reset_peak()
        run(base, batch)
        out["rss_growth_mb"] = common.peak_mb() - baseline
        del base, batch
        gc.collect()
    if args.mem in ("both", "tensor"):  # exact whatever came before
        base = common.load_minilm(seed=0)
        batch = common.make_batch(args.batch, args.seq, base.config.vocab_size)
        out["tensor_peak_mb"] = common.tensor_peak_mb(lambda: run(base, batch))
    return out


def timing(args) -> dict[str, dict]:
    common.set_threads(args.threads)
    cases, trainable, models, batch = {}, {}, {}, None
    for case in args.cases:
        base = common.load_minilm(seed=0)  # identical base for every case
        if batch is None:
            batch = common.make_batch(args.batch, args.seq, base.config.vocab_size)
        cases[case], trainable[case], models[case] = build(case, base, batch)
    parity = None
    if "infer_peft_lora" in models and "infer_poly_lora" in models:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        parity = check_lora_parity(models["infer_peft_lora"], models["infer_poly_lora"], inputs)
        if parity > 1e-4:
            raise SystemExit(f"polyadapter and PEFT LoRA logits differ by {parity:.3g}: not the same function")
    times = common.interleaved(cases, rounds=args.rounds, reps=args.reps, warmup=args.warmup,
                               clock=args.clock)
    out = {}
    for case in args.cases:
        out[case] = {"case": case, "what": DESCRIPTION[case], **common.summarize(times[case]),
                     "trainable_params": trainable[case] or None}
    if parity is not None:
        out["infer_poly_lora"]["parity_max_abs_diff"] = parity
    return out


MEM_FIELDS = {"tensor": "tensor_peak_mb", "rss": "rss_growth_mb"}


def add_ratios(results: dict[str, dict]) -> None:
    """time_vs_{full_ft,bare}, time_vs_peft and the same for each memory measure."""
    for case, r in results.items():
        pairs = []
        if REFERENCE[case] in results and case != REFERENCE[case]:
            pairs.append(("full_ft" if REFERENCE[case] == "full_ft" else "bare", results[REFERENCE[case]]))
        if PEER.get(case) in results:
            pairs.append(("peft", results[PEER[case]]))
        for label, other in pairs:
            r[f"time_vs_{label}"] = r["median_s"] / other["median_s"]
            for kind, field in MEM_FIELDS.items():
                if field in r and field in other and other[field] > 0:
                    r[f"{kind}_mem_vs_{label}"] = r[field] / other[field]


# ---------------------------------------------------------------- report
def report(results: dict[str, dict], args, env: dict) -> str:
    rows = []
    for case in args.cases:
        r = results[case]
        vs_ref = r.get("time_vs_full_ft", r.get("time_vs_bare", 1.0))
        rows.append([case, r["what"], r["median_s"] * 1000, vs_ref, r.get("time_vs_peft"),
                     r.get("tensor_peak_mb"), r.get("tensor_mem_vs_peft"),
                     r.get("rss_growth_mb"), r.get("rss_mem_vs_peft"), r.get("trainable_params")])
    table = common.markdown_table(
        ["case", "what", "median ms", "time vs ref", "time vs PEFT", "peak tensor MB",
         "tensor mem vs PEFT", "peak RSS growth MB", "RSS vs PEFT", "trainable params"], rows)
    lines = [
        "# Training step and inference on MiniLM-L6: polyadapter vs PEFT vs full fine-tuning",
        "",
        f"batch {args.batch} x seq {args.seq}, {env['threads']} torch threads, "
        f"{args.rounds} interleaved rounds x {args.reps} reps (median, {args.clock} clock), "
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env.get('peft')}, "
        f"{env['cores']} cores, load average at start {env.get('loadavg_1m', float('nan')):.2f}.",
        "",
        "Reference (`time vs ref`): `full_ft` for training cases, `infer_bare` for inference "
        "cases. A training step is zero_grad + forward with loss + backward + AdamW step. "
        "Memory: each case alone in a fresh process, build + "
        f"{args.mem_steps} calls; *peak tensor MB* is the peak of live tensor bytes allocated "
        "after the base was loaded (torch profiler; exact, repeatable), *peak RSS growth* is "
        "the RSS high-water mark minus the RSS with the base loaded and its weights paged in "
        "(what the OS sees, malloc slack included; moves by a few MB between runs).",
        "",
        table,
        "",
    ]
    load = env.get("loadavg_1m")
    if load is not None and env.get("cores") and load > 0.5 * env["cores"]:
        lines[3:3] = ["", f"**Busy machine** (load {load:.1f} on {env['cores']} cores): with several torch "
                      "threads every parallel op waits for a descheduled thread, so ops count more than "
                      "FLOPs and overheads look inflated. Trust only the ratios of cases timed side by "
                      "side, or rerun when quiet (`--threads 1 --clock cpu` is steadier meanwhile)."]

    def fmt(r, key, pct=False):
        v = r.get(key)
        if v is None:
            return "n/a"
        return f"{(v - 1) * 100:+.1f}%" if pct else f"{v:.3f}"

    summary = []
    if "poly_lora" in results and "time_vs_peft" in results["poly_lora"]:
        r = results["poly_lora"]
        summary.append(f"- polyadapter LoRA / PEFT LoRA, training step: time {fmt(r, 'time_vs_peft')}, "
                       f"peak tensor memory {fmt(r, 'tensor_mem_vs_peft')}, peak RSS growth "
                       f"{fmt(r, 'rss_mem_vs_peft')} (target <= 1.0)")
    if "infer_poly_lora" in results and "time_vs_peft" in results["infer_poly_lora"]:
        summary.append("- polyadapter / PEFT, inference with one unmerged LoRA: time "
                       f"{fmt(results['infer_poly_lora'], 'time_vs_peft')}")
    for case in ("peft_lora", "poly_lora", "poly_bottleneck"):
        if case in results and "time_vs_full_ft" in results[case]:
            r = results[case]
            summary.append(f"- {case} vs full fine-tuning: step time {fmt(r, 'time_vs_full_ft')}, "
                           f"peak tensor memory {fmt(r, 'tensor_mem_vs_full_ft')}")
    for case in ("infer_peft_lora", "infer_poly_lora"):
        if case in results and "time_vs_bare" in results[case]:
            summary.append(f"- {case}: overhead vs the bare model {fmt(results[case], 'time_vs_bare', pct=True)}")
    if "parity_max_abs_diff" in results.get("infer_poly_lora", {}):
        summary.append("- parity: same LoRA weights in both libraries, max |logit difference| "
                       f"{results['infer_poly_lora']['parity_max_abs_diff']:.2g}")
    return "\n".join(lines + summary) + "\n"


def plot(results: dict[str, dict], args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {"full_ft": "#888888", "infer_bare": "#888888", "peft_lora": "#e07b39",
              "infer_peft_lora": "#e07b39", "poly_lora": "#3b75af", "infer_poly_lora": "#3b75af",
              "poly_bottleneck": "#5aa05a"}

    def bars(ax, cases, values, title, ylabel, ref_line=None):
        keep = [(c, v) for c, v in zip(cases, values) if v is not None]
        if not keep:
            ax.set_axis_off()
            return
        cases, values = zip(*keep)
        ax.bar(range(len(cases)), values, color=[colors[c] for c in cases])
        ax.set_xticks(range(len(cases)), cases, rotation=20, ha="right")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        if ref_line is not None:
            ax.axhline(ref_line, color="black", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)

    tc = [c for c in TRAIN_CASES if c in results]
    ic = [c for c in INFER_CASES if c in results]
    if tc:
        bars(axes[0], tc, [results[c]["median_s"] / results[tc[0]]["median_s"] for c in tc],
             f"training step time / {tc[0]}", "ratio", 1.0)
    if ic:
        bars(axes[1], ic, [results[c]["median_s"] / results[ic[0]]["median_s"] for c in ic],
             f"inference time / {ic[0]}", "ratio", 1.0)
    bars(axes[2], tc + ic, [results[c].get("tensor_peak_mb") for c in tc + ic],
         "peak tensor memory over the loaded base (MB)", "MB")
    fig.suptitle(f"MiniLM-L6, batch {args.batch} x seq {args.seq}, {args.threads} threads, "
                 f"median of {args.rounds * args.reps} interleaved ({args.clock} clock)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (median over all)")
    p.add_argument("--reps", type=int, default=1, help="calls per case per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per case first")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall time (default) or process CPU time (steadier on a shared machine)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps per case in the memory subprocess")
    p.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    p.add_argument("--mem", choices=["both", "rss", "tensor", "none"], default="both",
                   help="peak-memory measurements, each case in a fresh subprocess (see common.py)")
    p.add_argument("--quick", action="store_true", help="batch 4 x seq 32, 3 rounds: a smoke test")
    p.add_argument("--out", type=Path, default=common.OUT_DIR)
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: memory subprocess
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(batch=4, seq=32, rounds=3, warmup=1)
        args = p.parse_args(argv)
    if args.mem_steps < 2:
        p.error("--mem-steps must be at least 2 (the optimizer state appears after the first step)")
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:  # memory subprocess
        print(json.dumps(memory_case(args)), flush=True)
        return
    if "poly_bottleneck" in args.cases:
        try:
            from polyadapter import BottleneckConfig  # noqa: F401
        except ImportError:
            print("# polyadapter has no BottleneckConfig yet: skipping poly_bottleneck", file=sys.stderr)
            args.cases.remove("poly_bottleneck")
    common.set_threads(args.threads)
    env = common.env_info()
    results = timing(args)
    if args.mem != "none":
        script = str(Path(__file__).resolve())
        for case in args.cases:
            mem = common.measure_in_subprocess(script, [
                "--case", case, "--mem", args.mem, "--batch", str(args.batch),
                "--seq", str(args.seq), "--threads", str(args.threads),
                "--mem-steps", str(args.mem_steps)])
            if "error" in mem:
                print(f"# memory for {case} failed: {mem['error']}", file=sys.stderr)
                continue
            mem.pop("case")
            results[case].update(mem)
    add_ratios(results)
    for case in args.cases:
        print(json.dumps({"bench": "train_step", "batch": args.batch, "seq": args.seq,
                          "threads": args.threads, "clock": args.clock, **results[case]}), flush=True)
    md = report(results, args, env)
    print()
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_step.md").write_text(md)
    plot(results, args, args.out / "train_step.png")
    print(f"wrote {args.out / 'train_step.md'} and {args.out / 'train_step.png'}", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/transformers
    main()
