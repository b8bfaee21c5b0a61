"""Per-site benchmark: one decoder layer's seven LoRA sites at SmolLM2-135M's widths
(hidden 576, key/value 192, MLP 1536; rank 16) on one-token rows, as a serving
engine's decode step hands them over, against the bare layer and PEFT's mixed-batch
path on the same weights, in one process.

Cases: rows in {16, 32} over {1, 6, 16} distinct adapters, rows ordered by adapter (as
the engine orders a step). For polyadapter each case also runs with every torch
strategy forced in turn (``auto`` is what the engine gets):
- ``padded``: the rows gathered into one (slots, longest run, in) block, two batched
  matmuls over the used range of slots;
- ``runs``: one matmul pair per run of rows sharing a slot, in place;
- ``grouped_mm``: sorted segments through ``torch.nn.functional.grouped_mm``;
- ``gather``: each row's weights gathered, one batched matmul.

The row plan is built once per case, outside the clock, as the engine builds it once
per step for all of a model's layers. Reported: milliseconds per layer call (median of
interleaved rounds) and the bare layer's time divided by each case's, i.e. the
throughput a layer keeps. One JSON line per case; a Markdown table and a plot in
bench/out/.

    python bench/lora_sites.py            # about 2 minutes on 2 cores
    python bench/lora_sites.py --quick    # a smoke run
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, env_info, interleaved, markdown_table, set_threads  # noqa: E402

import polyadapter as pa  # noqa: E402
from polyadapter.kernels import torch_ops  # noqa: E402
from polyadapter.mixed import RowPlan  # noqa: E402

HIDDEN, KV, MLP, RANK = 576, 192, 1536, 16
PROJECTIONS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV), "v_proj": (HIDDEN, KV),
               "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, MLP), "up_proj": (HIDDEN, MLP),
               "down_proj": (MLP, HIDDEN)}


class Layer(nn.Module):
    """A decoder layer's seven projections, each on its own input (no attention or
    norms: what is timed is the sites). Returns every projection's output."""

    def __init__(self):
        super().__init__()
        for name, (k, m) in PROJECTIONS.items():
            setattr(self, name, nn.Linear(k, m, bias=False))

    def forward(self, x, x_mlp):
        return [getattr(self, n)(x_mlp if n == "down_proj" else x) for n in PROJECTIONS]


# strategy -> torch_ops settings that force it (auto: the defaults)
STRATEGIES = {
    "auto": {},
    "padded": {"_PADDED_WASTE": 10**9, "_LOOP_ROWS": 10**9, "_FAST_ROWS": 10**9},
    "runs": {"_PADDED_WASTE": 0, "_LOOP_ROWS": 0, "_FAST_ROWS": 0},
    "grouped_mm": {"_PADDED_WASTE": 0, "_LOOP_ROWS": 10**9, "_FAST_ROWS": 10**9},
    "gather": {"_segments_pay": lambda *a: False, "lora_add_": lambda *a, **k: False},
}


@contextmanager
def strategy(name: str):
    saved = {k: getattr(torch_ops, k) for k in STRATEGIES[name]}
    for k, v in STRATEGIES[name].items():
        setattr(torch_ops, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(torch_ops, k, v)


def build(n_adapters: int, seed: int = 0):
    """(bare layer, polyadapter model over a copy, PEFT model over another copy), the
    same LoRA weights in both libraries."""
    import peft
    torch.manual_seed(seed)
    bare = Layer().eval()
    pm = pa.AdapterModel(copy.deepcopy(bare))
    names = [f"a{i}" for i in range(n_adapters)]
    g = torch.Generator().manual_seed(seed)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(PROJECTIONS))
    peft_model = None
    for name in names:
        pm.add_adapter(name, pa.LoraConfig(r=RANK, alpha=2 * RANK, targets=list(PROJECTIONS)), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        if peft_model is None:
            peft_model = peft.get_peft_model(copy.deepcopy(bare), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        ours = pm.adapter_state_dict(name)
        with torch.no_grad():
            for site in PROJECTIONS:
                lora = getattr(peft_model.base_model.model, site)
                lora.lora_A[name].weight.copy_(ours[f"{site}.lora_A"])
                lora.lora_B[name].weight.copy_(ours[f"{site}.lora_B"])
    return bare, pm, peft_model.eval()


def run_case(rows: int, n_adapters: int, rounds: int) -> list[dict]:
    bare, pm, peft_model = build(n_adapters)
    setups = sorted(f"a{i % n_adapters}" for i in range(rows))   # rows in adapter order, as the engine orders them
    g = torch.Generator().manual_seed(1)
    x, x_mlp = torch.randn(rows, 1, HIDDEN, generator=g), torch.randn(rows, 1, MLP, generator=g)
    plan = RowPlan.build(setups, "cpu")
    ours_model = pm.model

    def ours():
        pm.state.rows = plan
        try:
            return ours_model(x, x_mlp)
        finally:
            pm.state.rows = None

    with torch.no_grad():
        ref = bare(x, x_mlp)
        out = ours()
        want = peft_model(x, x_mlp, adapter_names=setups)
        diff = max(float((a - b).abs().max()) for a, b in zip(out, want))
        moved = max(float((a - b).abs().max()) for a, b in zip(out, ref))
        cases = {"bare": lambda: bare(x, x_mlp), "peft": lambda: peft_model(x, x_mlp, adapter_names=setups)}
        for name in STRATEGIES:
            def timed(name=name):
                with strategy(name):
                    return ours()
            cases[name] = timed
        times = interleaved(cases, rounds=rounds, reps=5, warmup=3)
    base = statistics.median(times["bare"])
    out_rows = []
    for name, samples in times.items():
        med = statistics.median(samples)
        out_rows.append({"rows": rows, "distinct_adapters": n_adapters, "case": name,
                         "engine": "peft" if name == "peft" else ("bare" if name == "bare" else "polyadapter"),
                         "ms_per_layer": med * 1e3, "ratio_to_bare": base / med,
                         "max_abs_diff_vs_peft": diff, "max_abs_change_vs_bare": moved})
    return out_rows


def plot(rows: list[dict], png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    groups = sorted({(r["rows"], r["distinct_adapters"]) for r in rows})
    names = [n for n in ["auto", "padded", "runs", "grouped_mm", "gather", "peft"]]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [next(r["ratio_to_bare"] for r in rows if (r["rows"], r["distinct_adapters"]) == g and r["case"] == name)
                for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], vals, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{a} rows / {b} adapters" for a, b in groups])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("throughput / bare layer")
    ax.set_title("One SmolLM2-width decoder layer's LoRA sites, one-token rows (CPU)")
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 15)
    combos = [(16, 1), (16, 6)] if args.quick else [(16, 1), (16, 6), (16, 16), (32, 6), (32, 16)]
    rows = []
    for n_rows, n_adapters in combos:
        for r in run_case(n_rows, n_adapters, rounds):
            rows.append(r)
            print(json.dumps(r), flush=True)
    OUT_DIR.mkdir(exist_ok=True)
    name = "lora_sites_quick" if args.quick else "lora_sites"
    (OUT_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = markdown_table(["rows", "adapters", "case", "ms / layer", "throughput / bare"],
                           [[r["rows"], r["distinct_adapters"], r["case"], f"{r['ms_per_layer']:.3f}",
                             f"{r['ratio_to_bare']:.2f}"] for r in rows])
    diffs = max(r["max_abs_diff_vs_peft"] for r in rows)
    (OUT_DIR / f"{name}.md").write_text(
        f"# LoRA sites at SmolLM2's widths\n\n{json.dumps(env_info())}\n\n{table}\n\n"
        f"Largest difference from PEFT's outputs on the same weights: {diffs:.2e}.\n\n![plot]({name}.png)\n")
    plot(rows, OUT_DIR / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
