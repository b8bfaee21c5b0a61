"""Mixed-adapter batches: throughput of a batch in which every row picks its own LoRA,
relative to the bare base model, for polyadapter and for PEFT's ``adapter_names``.

One process, one random-weight Llama-architecture model (TinyLlama-1.1B's widths:
hidden 2048, intermediate 5632, 32 heads, 4 KV heads, vocab 32000; fewer layers by
default, see ``--layers``), every case on the same weights (each library wraps its own
copy of the module tree; the weight tensors themselves are shared). Cases per shape:

  base             the bare model
  poly_single      polyadapter, one LoRA active (set_active), unmerged
  peft_single      PEFT, the same LoRA active (set_adapter), unmerged
  poly_mixed_N     polyadapter, ``adapter_names`` over N distinct LoRAs, rows round-robin
  peft_mixed_N     PEFT's ``adapter_names`` path on the same N LoRAs (same weights: ours
                   exported with ``save_adapter(format="peft")`` and loaded into a PeftModel)

for N in ``--distinct`` (1, 4, 16, 32, 64). Every LoRA is rank 16, alpha 32, on all
linear layers (``targets=["all-linear"]``: q, k, v, o, gate, up, down), with random
nonzero B, so the update is real arithmetic and changes the output.

Shapes:
  prefill  ``--batch`` rows x ``--tokens`` tokens, no cache, logits for the last token
           only (``logits_to_keep=1``, what ``generate`` does in its prefill; the output
           layer is not adapted, so computing 32000 logits for every token would only
           dilute the adapters' cost); ``--all-logits`` to compute them all.
  decode   one new token per row on a DynamicCache holding a ``--prefix``-token prefix.
           The cache is built once per case by a prefill with that case's own adapters;
           after every timed call it is cropped back to the prefix (untimed), so every
           call sees the same cache.

Correctness, before timing, per shape: the warm-up call of every case keeps its
last-token logits; polyadapter's and PEFT's must agree for every N (and for the single
LoRA) within ``--tol`` relative to the logits' scale (fp32; bf16 gets a looser default),
and row 0 (always the first LoRA) of every mixed case must equal the single-LoRA case's
row 0. The adapters' effect (mixed vs base) is reported too, so the agreement means
something. Any failure stops the benchmark.

Timing: under torch.inference_mode(), cases of one shape interleaved round by round
(see bench/common.py), median per case; ``torch.cuda.synchronize`` around every call on
a GPU. ``ratio_to_base`` = base time / case time: throughput relative to the bare
model (1.0 = as fast). Target: >= 0.8 on CPU, >= 0.9 on GPU.

    python bench/mixed_batch.py                 # full run (~8-10 min on 2 cores; 1 layer, see --layers)
    python bench/mixed_batch.py --quick         # hidden 256, 2 layers, few cases: a smoke test
    python bench/mixed_batch.py --shapes decode --rounds-decode 20
    python bench/mixed_batch.py --shapes decode --profile poly_mixed_64   # where the time goes

Prints one JSON line per case, then a Markdown report; writes bench/out/mixed_batch.jsonl,
bench/out/mixed_batch.md and bench/out/mixed_batch.png. Runs on CUDA (bf16) when a GPU
is present, on CPU (fp32) otherwise; ``--device`` overrides.
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

SHAPES = ("prefill", "decode")
R, ALPHA, TARGETS = 16, 32, ["all-linear"]
B_STD = 0.02  # random LoRA B: the update is ~10% of a site's output at these widths
TARGET_RATIO = {"cpu": 0.8, "cuda": 0.9}
NAME = "mixed_batch"


# ---------------------------------------------------------------- model and adapters
def build_base(args, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.tokens + args.prefix + 8), tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(cfg)
    model.eval()
    model.requires_grad_(False)
    w = model.model.layers[0].mlp.up_proj.weight
    if not w.std() > 0:
        raise SystemExit("the randomly initialised model has constant weights: transformers did not initialise it")
    return model.to(device=device, dtype=dtype)


def sharing_copy(model):
    """A new module tree whose parameters and buffers are the same tensors as ``model``'s:
    each library can wrap its own tree while every case multiplies by the same weights."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def build_poly(base, names: list[str], seed: int):
    import polyadapter
    pm = polyadapter.AdapterModel(base)
    torch.manual_seed(seed + 1)  # lora_A: polyadapter's default (Kaiming-uniform) init
    for name in names:
        pm.add_adapter(name, polyadapter.LoraConfig(r=R, alpha=ALPHA, targets=TARGETS), activate=False)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name in names:
            for site, part in sorted(pm.parts(name).items()):
                b = part.lora_B
                b.copy_((torch.randn(b.shape, generator=g) * B_STD).to(b.device, b.dtype))
    pm.eval()
    pm.set_active(names[0])  # for poly_single; mixed calls override it per call
    return pm


def build_peft(base, pm, names: list[str], folder: Path):
    """Export every adapter from polyadapter in PEFT's format and load them all into one
    PeftModel: the same tensors, read back through PEFT's own loader."""
    from peft import PeftModel
    for name in names:
        pm.save_adapter(name, folder / name, format="peft")
    dev = str(next(base.parameters()).device)
    peft_model = PeftModel.from_pretrained(base, str(folder / names[0]), adapter_name=names[0],
                                           autocast_adapter_dtype=False)  # keep bf16 LoRAs in bf16 on GPU
    for name in names[1:]:
        peft_model.load_adapter(str(folder / name), adapter_name=name, autocast_adapter_dtype=False,
                                torch_device=dev)
    peft_model.eval()
    peft_model.set_adapter(names[0])
    ours = len(pm.record(names[0]).sites)
    theirs = sum(1 for n, m in peft_model.named_modules() if n.endswith(f"lora_A.{names[0]}"))
    if ours != theirs:
        raise SystemExit(f"PEFT put adapter {names[0]!r} at {theirs} modules, polyadapter at {ours}")
    return peft_model


def layer_params(args) -> int:
    """Weights of the linear layers of one decoder layer."""
    head_dim = args.hidden // args.heads
    attn = 2 * args.hidden * args.hidden + 2 * args.hidden * args.kv_heads * head_dim
    return attn + 3 * args.hidden * args.intermediate


def rows_for(names: list[str], distinct: int, batch: int) -> list[str]:
    return [names[i % distinct] for i in range(batch)]


# ---------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    library: str          # torch | polyadapter | peft
    mode: str             # bare | single | mixed
    distinct: int         # distinct adapters in the batch (0 for the bare model)
    call: Callable | None  # call(**inputs) -> HF output
    base: object = None   # the bare model (for the output_layer case)
    prepare: Callable | None = None
    fn: Callable | None = None
    check: dict = field(default_factory=dict)


def make_cases(args, base, pm, peft_model, names: list[str]) -> list[Case]:
    cases = [Case("base", "torch", "bare", 0, lambda **kw: base(**kw)),
             Case("poly_single", "polyadapter", "single", 1, lambda **kw: pm(**kw))]
    if peft_model is not None:
        cases.append(Case("peft_single", "peft", "single", 1, lambda **kw: peft_model(**kw)))
    for d in args.distinct:
        rows = rows_for(names, d, args.batch)
        cases.append(Case(f"poly_mixed_{d}", "polyadapter", "mixed", d,
                          lambda rows=rows, **kw: pm(adapter_names=rows, **kw)))
        if peft_model is not None:
            cases.append(Case(f"peft_mixed_{d}", "peft", "mixed", d,
                              lambda rows=rows, **kw: peft_model(adapter_names=rows, **kw)))
    if args.cases:
        keep = set(args.cases) | {"base"}
        cases = [c for c in cases if c.name in keep]
    cases.append(Case("output_layer", "torch", "head", 0, None, base=base))  # timed alone, see bind()
    return cases


def crop_to(cache, length: int) -> None:
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)  # negative: remove that many tokens (every transformers version)


def bind(case: Case, shape: str, args, device) -> None:
    """Give ``case`` its timed call ``fn`` (and untimed ``prepare``) for ``shape``."""
    g = torch.Generator().manual_seed(args.seed + 10)
    b = args.batch
    if case.mode == "head":  # final norm + output layer on one token per row: the part of every
        # case's time that no adapter touches, timed alone so it can be taken out (decoder_ratio_to_base)
        model = case.base
        h = torch.randn(b, 1, args.hidden, generator=g).to(device=device, dtype=model.lm_head.weight.dtype)
        case.prepare = None
        case.fn = lambda: model.lm_head(model.model.norm(h))
        return
    if shape == "prefill":
        ids = torch.randint(0, args.vocab, (b, args.tokens), generator=g).to(device)
        mask = torch.ones_like(ids)
        extra = {} if args.all_logits else {"logits_to_keep": 1}
        case.prepare = None
        case.fn = lambda: case.call(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
        return
    prefix = torch.randint(0, args.vocab, (b, args.prefix), generator=g).to(device)
    nxt = torch.randint(0, args.vocab, (b, 1), generator=g).to(device)
    mask = torch.ones(b, args.prefix + 1, dtype=torch.long, device=device)
    out = case.call(input_ids=prefix, attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or out.past_key_values
    if cache.get_seq_length() != args.prefix:
        raise SystemExit(f"{case.name}: the prefill cache holds {cache.get_seq_length()} tokens, not {args.prefix}")
    case.prepare = lambda: crop_to(cache, args.prefix)
    cache_kw = {cache_arg(): cache}
    case.fn = lambda: case.call(input_ids=nxt, attention_mask=mask, use_cache=True, **cache_kw)


def cache_arg() -> str:
    """The KV-cache keyword of the model's forward: ``cache`` from transformers 5.2x on
    (``past_key_values`` still works there but warns), ``past_key_values`` before."""
    import inspect

    from transformers import LlamaForCausalLM
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def last_logits(out) -> torch.Tensor:
    return out.logits[:, -1].float().cpu()


# ---------------------------------------------------------------- correctness
def check(cases: list[Case], outs: dict[str, torch.Tensor], shape: str, tol: float, args) -> dict:
    """Compare the warm-up outputs; raise SystemExit on any disagreement."""
    base = outs["base"]
    scale = base.abs().max().item()
    res = {"shape": shape, "logit_scale": scale, "tol_rel": tol, "pairs": []}
    fails = []

    def rel(a, b):
        return (a - b).abs().max().item() / scale

    for c in cases:
        peer = c.name.replace("poly_", "peft_")
        if c.library != "polyadapter":
            continue
        if peer in outs:
            d = rel(outs[c.name], outs[peer])
            res["pairs"].append({"case": c.name, "vs": peer, "max_abs_diff": d * scale, "rel": d})
            c.check["vs_peft_max_abs_diff"] = d * scale
            if not d <= tol:
                fails.append(f"{c.name} vs {peer}: max |diff| {d * scale:.3g} = {d:.3g} x logit scale > {tol:g}")
        if c.mode == "mixed" and "poly_single" in outs:  # row 0 always runs the first LoRA
            d = rel(outs[c.name][0], outs["poly_single"][0])
            res["pairs"].append({"case": c.name + "[row 0]", "vs": "poly_single[row 0]", "max_abs_diff": d * scale,
                                 "rel": d})
            if not d <= tol:
                fails.append(f"{c.name} row 0 vs poly_single row 0: {d:.3g} x logit scale > {tol:g}")
    mixed = [c.name for c in cases if c.mode == "mixed"]
    if mixed:
        effect = rel(outs[mixed[-1]], base)
        res["adapter_effect_rel"] = effect
        if not effect > 10 * tol:
            fails.append(f"{mixed[-1]} differs from the bare model by only {effect:.3g} x logit scale: "
                         f"the adapters do not change the output enough for the check to mean anything")
    if fails:
        raise SystemExit(f"correctness check failed ({shape}):\n  " + "\n  ".join(fails))
    res["max_rel_vs_peft"] = max((p["rel"] for p in res["pairs"] if p["vs"].startswith("peft")), default=None)
    res["max_abs_vs_peft"] = max((p["max_abs_diff"] for p in res["pairs"] if p["vs"].startswith("peft")),
                                 default=None)
    return res


# ---------------------------------------------------------------- one shape
def run_shape(shape: str, cases: list[Case], args, device, tol: float) -> tuple[dict, dict]:
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    t0 = time.perf_counter()
    with torch.inference_mode():
        for c in cases:
            bind(c, shape, args, device)
        outs = {}
        for c in cases:  # first warm-up call: its output is the one checked
            if c.prepare:
                c.prepare()
            out = c.fn()
            if c.mode != "head":
                outs[c.name] = last_logits(out)
        if shape == "decode":  # the cache really is restored: a second call gives the same logits
            c = [c for c in cases if c.mode != "head"][-1]
            c.prepare()
            again = last_logits(c.fn())
            diff = (again - outs[c.name]).abs().max().item()
            if diff > tol * outs["base"].abs().max().item():
                raise SystemExit(f"decode: a second call of {c.name} on the cropped cache differs by {diff:.3g}: "
                                 f"the cache is not restored between calls")
        parity = check(cases, outs, shape, tol, args)
        print(f"# {shape}: built and checked in {time.perf_counter() - t0:.0f} s; {parity_summary(parity)}",
              file=sys.stderr, flush=True)
        if args.profile:
            profile(shape, [c for c in cases if c.name in args.profile], args)
            return {}, parity
        rounds = args.rounds_prefill if shape == "prefill" else args.rounds_decode
        t1 = time.perf_counter()
        times = common.interleaved_prepared({c.name: (c.prepare, c.fn) for c in cases}, rounds=rounds,
                                            reps=args.reps, warmup=args.warmup - 1, clock=args.clock, sync=sync)
    print(f"# {shape}: timed in {time.perf_counter() - t1:.0f} s", file=sys.stderr, flush=True)
    return {c.name: common.summarize(times[c.name]) for c in cases}, parity


def profile(shape: str, cases: list[Case], args) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    args.out.mkdir(parents=True, exist_ok=True)
    for c in cases:
        with torch_profile(activities=acts, record_shapes=True) as prof:
            for _ in range(args.profile_calls):
                if c.prepare:
                    c.prepare()
                c.fn()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                       row_limit=25)
        path = args.out / f"{NAME}_profile_{shape}_{c.name}.txt"
        path.write_text(f"{c.name} ({shape}), {args.profile_calls} calls\n\n{table}\n\n{by_shape}\n")
        print(f"\n## profile {c.name} ({shape}), {args.profile_calls} calls\n{table}", flush=True)
        print(f"# wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------- results
def results_for(shape: str, cases: list[Case], times: dict, args, device, dtype) -> list[dict]:
    base_s = times["base"]["median_s"]
    head_s = times["output_layer"]["median_s"] if "output_layer" in times else 0.0
    tokens = args.tokens if shape == "prefill" else 1
    out = {}
    for c in cases:
        if c.mode == "head":
            continue
        t = times[c.name]
        out[c.name] = {
            "bench": NAME, "case": c.name, "shape": shape, "library": c.library, "mode": c.mode,
            "distinct_adapters": c.distinct, "batch": args.batch, "tokens_per_row": tokens,
            "prefix": args.prefix if shape == "decode" else 0, "layers": args.layers,
            "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "median_ms": t["median_s"] * 1e3, "p25_ms": t["p25_s"] * 1e3, "p75_ms": t["p75_s"] * 1e3,
            "min_ms": t["min_s"] * 1e3, "n": t["n"],
            "tokens_per_s": args.batch * tokens / t["median_s"],
            "ratio_to_base": base_s / t["median_s"],
            # the same without the output layer's time (no adapter acts there; with few layers it is a
            # large, adapter-free share of the bare model's time): the ratio for the decoder stack alone,
            # which deeper models approach
            "decoder_ratio_to_base": (base_s - head_s) / (t["median_s"] - head_s),
            "output_layer_ms": head_s * 1e3,
            "commit": args.commit,
        }
        if c.check:
            out[c.name].update(c.check)
    for name, r in out.items():
        peer = name.replace("poly_", "peft_")
        if r["library"] == "polyadapter" and peer in out:
            r["peft_median_ms"] = out[peer]["median_ms"]
            r["peft_ratio_to_base"] = out[peer]["ratio_to_base"]
            r["peft_decoder_ratio_to_base"] = out[peer]["decoder_ratio_to_base"]
            r["speedup_vs_peft"] = out[peer]["median_ms"] / r["median_ms"]
    return list(out.values())


def report(rows: list[dict], parity: dict, args, env: dict, device, dtype, runtime_s: float) -> str:
    target = TARGET_RATIO[device.type if device.type in TARGET_RATIO else "cpu"]
    lines = [
        "# Mixed-adapter batches: polyadapter vs PEFT `adapter_names`, throughput relative to the bare model",
        "",
        f"Random-weight Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, "
        f"{args.kv_heads} KV heads, vocab {args.vocab}, **{args.layers} layer{'s' if args.layers != 1 else ''}** "
        f"({'TinyLlama-1.1B widths, ' if args.hidden == 2048 and args.intermediate == 5632 else ''}"
        f"fewer layers than its 22), {str(dtype).replace('torch.', '')} on {device.type}. "
        f"Every LoRA: r={R}, alpha={ALPHA}, all linear layers (7 per layer), random nonzero B. "
        f"Batch {args.batch} rows, rows assigned round-robin to the N distinct adapters.",
        "",
        f"- prefill: {args.batch} x {args.tokens} tokens, no cache, "
        f"{'all logits' if args.all_logits else 'logits of the last token only (logits_to_keep=1)'}; "
        f"{args.rounds_prefill} interleaved rounds x {args.reps}.",
        f"- decode: {args.batch} x 1 new token on a DynamicCache of a {args.prefix}-token prefix (built once per "
        f"case with that case's adapters, cropped back after every call, untimed); {args.rounds_decode} "
        f"interleaved rounds x {args.reps}.",
        f"- median of the {args.clock} clock under torch.inference_mode(); `ratio` = base time / case time "
        f"(throughput relative to the bare model; 1.0 = as fast). Target: >= {target}.",
        "- `ratio, decoder only` = (base - output layer) / (case - output layer): the output layer (lm_head, "
        f"{args.vocab} x {args.hidden}) carries no adapter but weighs as much as "
        f"{args.vocab * args.hidden / layer_params(args):.1f} decoder layers (this model has {args.layers}), "
        "so it flatters every ratio here; the decoder-only ratio is what a deep model (TinyLlama has 22 layers) "
        "approaches.",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, peft {env.get('peft')}, "
        f"{env['threads']} torch threads, {env['cores']} cores ({env['cpu']}), "
        f"{env.get('gpu', 'no GPU')}, load average at start {env.get('loadavg_1m', float('nan')):.2f}. "
        f"polyadapter at commit {args.commit}. Total runtime {runtime_s:.0f} s.",
        "",
    ]
    load = env.get("loadavg_1m")
    if device.type == "cpu" and load is not None and env.get("cores") and load > 0.5 * env["cores"]:
        lines += [f"**Busy machine** (load {load:.1f} on {env['cores']} cores): trust only ratios of cases "
                  "timed side by side.", ""]
    for shape in SHAPES:
        sr = [r for r in rows if r["shape"] == shape]
        if not sr:
            continue
        by = {r["case"]: r for r in sr}
        base = by["base"]
        lines += [f"## {shape}", "",
                  f"bare model: {base['median_ms']:.1f} ms per call ({base['tokens_per_s']:.0f} tokens/s), of which "
                  f"the output layer (final norm + lm_head on {args.batch} x 1 token, timed alone) "
                  f"{base['output_layer_ms']:.1f} ms.", ""]
        table = []
        for r in sr:
            if r["library"] != "polyadapter":
                continue
            label = "1 (single, set_active)" if r["mode"] == "single" else str(r["distinct_adapters"])
            table.append([label, r["median_ms"], r["ratio_to_base"], r["decoder_ratio_to_base"],
                          r.get("peft_median_ms"), r.get("peft_ratio_to_base"), r.get("peft_decoder_ratio_to_base"),
                          r.get("speedup_vs_peft"), "yes" if r["ratio_to_base"] >= target else "no"])
        lines.append(common.markdown_table(
            ["distinct adapters", "polyadapter ms", "polyadapter ratio", "polyadapter ratio, decoder only",
             "PEFT ms", "PEFT ratio", "PEFT ratio, decoder only", "PEFT time / polyadapter time",
             f"polyadapter ratio >= {target}"], table))
        p = parity.get(shape)
        if p:
            lines += ["", f"Correctness ({shape}, last-token logits; scale = max |logit| of the bare model = "
                      f"{p['logit_scale']:.3g}; tolerance {p['tol_rel']:g} x scale): {parity_summary(p)}."]
        lines.append("")
    lines += ["![throughput relative to the bare model](mixed_batch.png)", ""]
    return "\n".join(lines)


def parity_summary(p: dict) -> str:
    parts = []
    if p.get("max_abs_vs_peft") is not None:
        parts.append(f"max |polyadapter - PEFT| over all cases = {p['max_abs_vs_peft']:.3g} "
                     f"({p['max_rel_vs_peft']:.2g} x scale)")
    row0 = [q["rel"] for q in p["pairs"] if q["vs"] == "poly_single[row 0]"]
    if row0:
        parts.append(f"row 0 of every mixed case vs the single-LoRA case: max {max(row0):.2g} x scale")
    if "adapter_effect_rel" in p:
        parts.append(f"adapters' effect, mixed vs bare = {p['adapter_effect_rel']:.3g} x scale")
    return "; ".join(parts) or "nothing to compare"


def plot(rows: list[dict], args, device, dtype, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    target = TARGET_RATIO[device.type if device.type in TARGET_RATIO else "cpu"]
    shapes = [s for s in SHAPES if any(r["shape"] == s for r in rows)]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.2 * len(shapes), 5.2), squeeze=False)
    style = {"polyadapter": ("#3b75af", "o"), "peft": ("#e07b39", "s")}
    for ax, shape in zip(axes[0], shapes):
        sr = [r for r in rows if r["shape"] == shape]
        for lib, (color, marker) in style.items():
            mixed = sorted((r for r in sr if r["library"] == lib and r["mode"] == "mixed"),
                           key=lambda r: r["distinct_adapters"])
            if mixed:
                xs = [r["distinct_adapters"] for r in mixed]
                ys = [r["ratio_to_base"] for r in mixed]
                ax.plot(xs, ys, color=color, marker=marker, label=f"{lib}, mixed batch")
                ax.plot(xs, [r["decoder_ratio_to_base"] for r in mixed], color=color, ls=":", lw=1,
                        label=f"{lib}, mixed, decoder only")
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                                fontsize=7, color=color)
            single = [r for r in sr if r["library"] == lib and r["mode"] == "single"]
            if single:
                ax.plot([1], [single[0]["ratio_to_base"]], color=color, marker=marker, ls="none",
                        markerfacecolor="none", markersize=10, label=f"{lib}, single LoRA (set_active)")
        ax.axhline(1.0, color="#888888", lw=0.8)
        ax.axhline(target, color="black", lw=1, ls="--", label=f"target {target}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["distinct_adapters"] for r in sr if r["distinct_adapters"] > 0})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_ylim(0, max(1.1, max(r["ratio_to_base"] for r in sr) + 0.08))
        ax.set_xlabel("distinct adapters in the batch")
        ax.set_ylabel("throughput relative to the bare model")
        tok = f"{args.tokens} tokens" if shape == "prefill" else f"1 token, {args.prefix}-token cache"
        ax.set_title(f"{shape}: {args.batch} rows x {tok}", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Llama h{args.hidden}/i{args.intermediate}, {args.layers} layer{'s' if args.layers != 1 else ''}, "
                 f"{str(dtype).replace('torch.', '')} on {device.type}, LoRA r={R} on all linear layers",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default 1 on CPU, which keeps the full run under 10 minutes on 2 cores; "
                        "22 = TinyLlama's on CUDA)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=64, help="rows per batch")
    p.add_argument("--tokens", type=int, default=128, help="tokens per row in the prefill shape")
    p.add_argument("--prefix", type=int, default=128, help="cached prefix length in the decode shape")
    p.add_argument("--distinct", default="1,4,16,32,64", help="distinct adapter counts (comma-separated)")
    p.add_argument("--shapes", default="prefill,decode")
    p.add_argument("--cases", default=None, help="only these cases (comma-separated; base is always kept)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT (no parity check against it)")
    p.add_argument("--all-logits", action="store_true", help="prefill computes logits for every token")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds-prefill", type=int, default=None, help="interleaved rounds, prefill (default 5; 20 on CUDA)")
    p.add_argument("--rounds-decode", type=int, default=None, help="interleaved rounds, decode (default 50)")
    p.add_argument("--reps", type=int, default=1, help="calls per case per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per case first (>= 1; the first is checked)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    p.add_argument("--tol", type=float, default=None,
                   help="max |polyadapter - PEFT| relative to the logit scale (default 1e-3 fp32, 3e-2 bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default=None,
                   help="comma-separated cases to profile (torch.profiler) instead of timing")
    p.add_argument("--profile-calls", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="hidden 256, 2 layers, batch 16 x 32 tokens, distinct 1,4,16, 3 rounds: a smoke test")
    p.add_argument("--out", type=Path, default=common.OUT_DIR)
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(hidden=256, intermediate=688, heads=8, kv_heads=2, vocab=1024, layers=2, batch=16,
                       tokens=32, prefix=32, distinct="1,4,16", rounds_prefill=3, rounds_decode=3)
        args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    if args.layers is None:
        args.layers = 22 if gpu else 1
    if args.rounds_prefill is None:
        args.rounds_prefill = 20 if gpu else 5
    if args.rounds_decode is None:
        args.rounds_decode = 50
    args.distinct = sorted({int(x) for x in args.distinct.split(",") if x.strip()})
    if not args.distinct or min(args.distinct) < 1 or max(args.distinct) > args.batch:
        p.error(f"--distinct must lie in 1..batch ({args.batch})")
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if set(args.shapes) - set(SHAPES):
        p.error(f"--shapes: choose from {SHAPES}")
    args.cases = [c.strip() for c in args.cases.split(",")] if args.cases else None
    args.profile = [c.strip() for c in args.profile.split(",")] if args.profile else None
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first warm-up call is the one checked)")
    return args


def git_commit() -> str:
    """HEAD of this checkout, with "+dirty" when src/ has uncommitted changes (read-only git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def main(argv=None) -> None:
    t_start = time.perf_counter()
    args = parse_args(argv)
    args.commit = git_commit()
    device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = args.tol if args.tol is not None else (1e-3 if dtype == torch.float32 else 3e-2)
    common.set_threads(args.threads)
    import peft  # noqa: F401  (imported before timing; its import is slow)
    import polyadapter  # noqa: F401
    env = common.env_info()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)

    names = [f"lora{i:02d}" for i in range(max(args.distinct))]
    base = build_base(args, device, dtype)
    t0 = time.perf_counter()
    pm = build_poly(sharing_copy(base), names, args.seed)
    peft_model = None
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_peft:
            peft_model = build_peft(sharing_copy(base), pm, names, Path(tmp))
    print(f"# model ({args.layers} layers, {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params, "
          f"{dtype}, {device}) and {len(names)} adapters per library built in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)

    gc.collect()
    gc.freeze()  # the models' many objects leave the collector's view: gc.collect() between calls stays cheap
    rows, parity = [], {}
    try:
        for shape in args.shapes:
            cases = make_cases(args, base, pm, peft_model, names)
            times, parity[shape] = run_shape(shape, cases, args, device, tol)
            if times:
                for r in results_for(shape, cases, times, args, device, dtype):
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            del cases
    finally:
        gc.unfreeze()  # frozen objects would never be freed at exit (and extension modules complain)
    runtime = time.perf_counter() - t_start
    if args.profile:
        print(f"# profiled in {runtime:.0f} s", file=sys.stderr)
        return
    md = report(rows, parity, args, env, device, dtype, runtime)
    print()
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / f"{NAME}.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    (args.out / f"{NAME}.md").write_text(md)
    plot(rows, args, device, dtype, args.out / f"{NAME}.png")
    print(f"# wrote {args.out / (NAME + '.jsonl')}, {args.out / (NAME + '.md')} and {args.out / (NAME + '.png')} "
          f"({runtime:.0f} s in all)", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft/transformers
    main()
