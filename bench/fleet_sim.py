"""Fleet simulation: R replicas of polyadapter's engine serving 10,000 adapters, and
four ways to route requests to them. A discrete-event simulation (heapq), with step
costs measured on this machine.

Model. Each replica runs continuous batching as the engine does: at most B running
requests; each step decodes one token for every running request past its prefill and
prefills prompt chunks (at most ``chunk`` tokens each) while the step's token budget
lasts; waiting requests join in arrival order when their adapter is on the device.
A replica keeps S device slots (LRU; an adapter a request on the replica still needs is
never evicted) and a host tier of H adapters (LRU). A device miss queues a read on the
replica's single background reader: ``store_read_ms + prepare_ms`` from the store, or
only ``prepare_ms`` when the host tier has it; then ``install_ms`` on the step loop
(it lengthens that replica's next step). KV room is not modelled (assumed enough).

Step cost (ms) = (decode_fixed_ms + decode_per_row_ms * decode rows
                  + prefill_ms_per_token * prefill tokens)
                 * (1 + adapter_first_frac * [d >= 1] + adapter_extra_frac * max(0, d - 1))
with d the distinct adapters among the step's requests.

Costs. ``--costs FILE``: a JSON object with any of the fields above plus
``store_read_ms``, ``prepare_ms``, ``install_ms`` (the others keep their defaults).
``--from-bench PATH``: derived from bench/serve_engine.py's JSON lines (fp32,
all-at-once lora16 cases: tpot_p50_ms of 0, 1 and the most distinct adapters give the
step cost, load_ms_p50 the store read, install_ms_p50 the install). Defaults: measured
on this machine (SmolLM2-135M, fp32, 2 cores): a 16-row decode step without adapters
~300 ms; 1 LoRA 0.86x that throughput, 8 distinct 0.57x; prefill 2,048 tokens in 4.7 s;
store read ~50 ms, prepare ~80 ms (background), install ~12 ms (step loop). The split
of the 300 ms into fixed + per-row (260 + 2.5/row) is an assumption, not a measurement.

Policies: random; least_loaded (fewest in-flight requests); ray_multiplex (Ray Serve's
multiplexed routing: power of two choices among the replicas that have the adapter
loaded or loading and are not busy (in-flight < B); else among those with the fewest
adapters loaded; else among all); hash_bounded (consistent hashing with bounded loads,
Mirrokni et al.: walk the ring from the adapter's point to the first replica whose
in-flight count is below ceil(c * (total + 1) / R)).

    python bench/fleet_sim.py --quick          # well under a minute
    python bench/fleet_sim.py                  # 20,000 requests per case
"""
from __future__ import annotations

import argparse
import bisect
import hashlib
import heapq
import json
import math
import random
import sys
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

OUT_DIR = Path(__file__).resolve().parent / "out"
POLICIES = ("random", "least_loaded", "ray_multiplex", "hash_bounded")


# ---------------------------------------------------------------- costs
@dataclass
class Costs:
    decode_fixed_ms: float = 260.0        # 260 + 2.5 * 16 rows = the measured 300 ms
    decode_per_row_ms: float = 2.5        # assumed slope (not measured)
    adapter_first_frac: float = 1 / 0.86 - 1                  # 0.86x throughput with one LoRA
    adapter_extra_frac: float = (1 / 0.57 - 1 / 0.86) / 7     # 0.57x with 8 distinct
    prefill_ms_per_token: float = 4700 / 2048
    store_read_ms: float = 50.0
    prepare_ms: float = 80.0
    install_ms: float = 12.0
    source: str = "defaults: measured on this machine (SmolLM2-135M, fp32, 2 cores)"

    def factor(self, distinct: int) -> float:
        return 1 + (self.adapter_first_frac if distinct else 0) + self.adapter_extra_frac * max(0, distinct - 1)

    def step_ms(self, rows: int, prefill_tokens: int, distinct: int) -> float:
        work = self.decode_fixed_ms + self.decode_per_row_ms * rows + self.prefill_ms_per_token * prefill_tokens
        return work * self.factor(distinct)


def costs_from_json(path: str) -> Costs:
    data = json.loads(Path(path).read_text())
    known = {f.name for f in fields(Costs)}
    unknown = set(data) - known
    if unknown:
        raise SystemExit(f"{path}: unknown cost fields {sorted(unknown)}; known: {sorted(known)}")
    return Costs(**{"source": f"--costs {path}", **data})


def costs_from_bench(path: str) -> Costs:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.startswith("{")]
    rows = [r for r in rows if r.get("engine") == "polyadapter" and r.get("workload") == "all_at_once"
            and r.get("adapter_kind") == "lora16" and r.get("dtype") == "float32"
            and r.get("registered", 0) <= r.get("device_slots", 0) and r.get("tpot_p50_ms")]
    by_n = {r["distinct_adapters"]: r for r in rows}
    if 0 not in by_n or 1 not in by_n or max(by_n) < 2:
        raise SystemExit(f"{path}: needs fp32 lora16 all-at-once cases with 0, 1 and >= 2 distinct adapters")
    c, k = Costs(), max(by_n)
    t0, concurrency = by_n[0]["tpot_p50_ms"], by_n[0]["requests"]
    scale = t0 / (c.decode_fixed_ms + c.decode_per_row_ms * concurrency)
    first = by_n[1]["tpot_p50_ms"] / t0 - 1
    extra = max(0.0, (by_n[k]["tpot_p50_ms"] / t0 - 1 - first) / (k - 1))
    loads = [r["load_ms_p50"] for r in by_n.values() if r.get("load_ms_p50")]
    installs = [r["install_ms_p50"] for r in by_n.values() if r.get("install_ms_p50")]
    return Costs(decode_fixed_ms=c.decode_fixed_ms * scale, decode_per_row_ms=c.decode_per_row_ms * scale,
                 adapter_first_frac=first, adapter_extra_frac=extra,
                 store_read_ms=loads[-1] if loads else c.store_read_ms,
                 install_ms=installs[-1] if installs else c.install_ms,
                 source=f"--from-bench {path} (tpot_p50 at 0/1/{k} adapters, load/install p50; "
                        f"prefill and prepare: defaults)")


@dataclass
class Fleet:
    replicas: int = 8
    slots: int = 16                 # device slots per replica (S)
    max_running: int = 32           # running requests per replica (B)
    host: int = 256                 # host-memory tier per replica (H adapters)
    max_batched_tokens: int = 1024  # token budget per step
    chunk: int = 512                # longest prefill chunk


# ---------------------------------------------------------------- workload
@dataclass(frozen=True)
class Job:
    idx: int
    arrival_ms: float
    adapter: int          # popularity rank: 0 is the most popular
    prompt: int
    output: int


def zipf_probs(n: int, s: float) -> list[float]:
    w = [1 / (k + 1) ** s for k in range(n)]
    total = sum(w)
    return [x / total for x in w]


def expected_distinct(probs: list[float], draws: int) -> float:
    return sum(1 - (1 - p) ** draws for p in probs)


def capacity_rps(costs: Costs, fleet: Fleet, probs, prompt_range, output_range) -> float:
    """Requests/s one replica sustains without routing affinity: batches of b rows drawn
    independently from the popularity, b the most (<= B) whose expected distinct adapters
    fit the S device slots (every running request pins its adapter's slot)."""
    b = max([k for k in range(1, fleet.max_running + 1) if expected_distinct(probs, k) <= fleet.slots] or [1])
    d = expected_distinct(probs, b)
    out, prompt = sum(output_range) / 2, sum(prompt_range) / 2
    decode = (out - 1) * (costs.decode_fixed_ms + costs.decode_per_row_ms * b) / b
    return 1000 / ((decode + prompt * costs.prefill_ms_per_token) * costs.factor(round(d)))


def workload(n: int, probs: list[float], rate_rps: float, cv: float, seed: int,
             prompt_range=(16, 256), output_range=(16, 128)) -> list[Job]:
    """Zipf popularity, Poisson arrivals (cv = 1) or Gamma with that coefficient of variation."""
    rng = random.Random(seed)
    cum, acc = [], 0.0
    for p in probs:
        acc += p
        cum.append(acc)
    mean_ms, shape, t, jobs = 1000 / rate_rps, 1 / cv ** 2, 0.0, []
    for i in range(n):
        adapter = min(bisect.bisect_left(cum, rng.random() * acc), len(probs) - 1)
        jobs.append(Job(i, t, adapter, rng.randint(*prompt_range), rng.randint(*output_range)))
        t += rng.expovariate(1 / mean_ms) if cv == 1 else rng.gammavariate(shape, mean_ms / shape)
    return jobs


# ---------------------------------------------------------------- simulation state
@dataclass(eq=False)
class Req:
    job: Job
    replica: int = -1
    prefilled: int = 0
    generated: int = 0
    first_token_ms: float | None = None
    finish_ms: float | None = None
    finishes: int = 0


@dataclass(eq=False)
class Replica:
    device: OrderedDict = field(default_factory=OrderedDict)   # adapter -> None, LRU order
    host: OrderedDict = field(default_factory=OrderedDict)
    refs: Counter = field(default_factory=Counter)             # adapter -> its requests here
    loading: set = field(default_factory=set)                  # being read, or waiting for a slot
    pending: deque = field(default_factory=deque)              # read, waiting to be installed
    blocked: dict = field(default_factory=dict)                # adapter -> requests waiting for it
    ready: list = field(default_factory=list)                  # heap of (idx, Req) whose adapter is in
    running: list = field(default_factory=list)
    reader_free_ms: float = 0.0
    busy: bool = False
    inflight: int = 0
    tokens: int = 0


def _h(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


def build_ring(replicas: int, vnodes: int) -> list[tuple[int, int]]:
    return sorted((_h(f"replica-{r}-vnode-{v}"), r) for r in range(replicas) for v in range(vnodes))


def _pow2(cands: list[int], reps: list[Replica], rng: random.Random) -> int:
    if len(cands) == 1:
        return cands[0]
    a, b = rng.sample(cands, 2)
    return b if reps[b].inflight < reps[a].inflight else a


def route(policy: str, adapter: int, reps: list[Replica], rng: random.Random, fleet: Fleet,
          ring, ring_keys, c: float, cap: int) -> int:
    n = len(reps)
    if policy == "random":
        return rng.randrange(n)
    if policy == "least_loaded":
        return min(range(n), key=lambda i: (reps[i].inflight, i))
    if policy == "ray_multiplex":
        free = [i for i in range(n) if reps[i].inflight < fleet.max_running]
        have = [i for i in free if adapter in reps[i].device or adapter in reps[i].loading]
        if not have and free:
            fewest = min(len(reps[i].device) for i in free)
            have = [i for i in free if len(reps[i].device) == fewest]
        return _pow2(have or list(range(n)), reps, rng)
    if policy == "hash_bounded":
        start = bisect.bisect_left(ring_keys, _h(f"adapter-{adapter}"))
        for k in range(len(ring)):
            r = ring[(start + k) % len(ring)][1]
            if reps[r].inflight + 1 <= cap:
                return r
        raise AssertionError("no replica below the bound: c must be >= 1")
    raise ValueError(f"unknown policy {policy!r}; known: {POLICIES}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


# ---------------------------------------------------------------- simulation
def simulate(jobs: list[Job], policy: str, fleet: Fleet | None = None, costs: Costs | None = None, seed: int = 0,
             c: float = 1.25, vnodes: int = 64, warmup: float = 0.1) -> tuple[dict, list[Req]]:
    """Run ``jobs`` through the fleet under ``policy``. Returns the case's statistics
    (over the requests after the first ``warmup`` fraction) and every request's state."""
    fleet, costs = fleet or Fleet(), costs or Costs()
    rng = random.Random(seed)
    reps = [Replica() for _ in range(fleet.replicas)]
    ring = build_ring(fleet.replicas, vnodes)
    ring_keys = [k for k, _ in ring]
    reqs = [Req(j) for j in jobs]
    first = int(len(jobs) * warmup)
    t0 = jobs[first].arrival_ms if jobs else 0.0
    events: list = []
    seq = 0
    st = Counter()
    steps_distinct, steps_rows, bound_excess, total_inflight = [], [], -math.inf, 0

    def push(t, kind, *payload):
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, payload))
        seq += 1

    def start_step(r: int, now: float) -> None:
        rep, installs = reps[r], 0
        while rep.pending:                                  # installs, in the order read
            if len(rep.device) >= fleet.slots:
                victim = next((a for a in rep.device if rep.refs[a] == 0), None)
                if victim is None:
                    break                                   # every slot is needed: wait for a finish
                del rep.device[victim]
            a = rep.pending.popleft()
            rep.loading.discard(a)
            rep.device[a] = None
            installs += 1
            for q in rep.blocked.pop(a, []):
                heapq.heappush(rep.ready, (q.job.idx, q))
        decode = [q for q in rep.running if q.prefilled == q.job.prompt]
        budget, chunks = fleet.max_batched_tokens - len(decode), []
        for q in rep.running:
            if q.prefilled < q.job.prompt and budget > 0:
                chunks.append((q, min(q.job.prompt - q.prefilled, budget, fleet.chunk)))
                budget -= chunks[-1][1]
        while budget > 0 and len(rep.running) < fleet.max_running and rep.ready:
            q = heapq.heappop(rep.ready)[1]
            rep.running.append(q)
            rep.device.move_to_end(q.job.adapter)
            chunks.append((q, min(q.job.prompt, budget, fleet.chunk)))
            budget -= chunks[-1][1]
        distinct = len({q.job.adapter for q in decode} | {q.job.adapter for q, _ in chunks})
        ms = installs * costs.install_ms
        if decode or chunks:
            ms += costs.step_ms(len(decode), sum(n for _, n in chunks), distinct)
        rep.busy = ms > 0
        if rep.busy:
            push(now + ms, "step", r, decode, chunks, distinct)

    def finish_step(r: int, now: float, decode, chunks, distinct) -> None:
        nonlocal total_inflight
        rep, done = reps[r], []
        for q in decode:
            q.generated += 1
            done += [q] if q.generated >= q.job.output else []
        for q, n in chunks:
            q.prefilled += n
            if q.prefilled == q.job.prompt:
                q.generated, q.first_token_ms = 1, now
                done += [q] if q.job.output == 1 else []
        rep.tokens += len(decode) + sum(q.prefilled == q.job.prompt for q, _ in chunks)
        if now >= t0:
            st["window_tokens"] += len(decode) + sum(q.prefilled == q.job.prompt for q, _ in chunks)
            steps_distinct.append(distinct)
            steps_rows.append(len(decode) + len(chunks))
        for q in done:
            rep.running.remove(q)
            q.finish_ms, q.finishes = now, q.finishes + 1
            rep.refs[q.job.adapter] -= 1
            rep.inflight -= 1
            total_inflight -= 1
        start_step(r, now)

    for q in reqs:
        push(q.job.arrival_ms, "arrive", q)
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "step":
            finish_step(payload[0], now, *payload[1:])
            continue
        if kind == "loaded":
            r, a = payload
            rep = reps[r]
            rep.host[a] = None
            rep.host.move_to_end(a)
            while len(rep.host) > fleet.host:
                rep.host.popitem(last=False)
            rep.pending.append(a)
        else:                                               # an arrival: route it
            q = payload[0]
            a, counted = q.job.adapter, q.job.idx >= first
            cap = math.ceil(c * (total_inflight + 1) / fleet.replicas)
            r = q.replica = route(policy, a, reps, rng, fleet, ring, ring_keys, c, cap)
            rep = reps[r]
            bound_excess = max(bound_excess, rep.inflight + 1 - cap)
            rep.inflight += 1
            total_inflight += 1
            rep.refs[a] += 1
            if a in rep.device:
                rep.device.move_to_end(a)
                heapq.heappush(rep.ready, (q.job.idx, q))
            else:
                rep.blocked.setdefault(a, []).append(q)
                if a not in rep.loading:                    # a device miss: queue a read
                    rep.loading.add(a)
                    cost = costs.prepare_ms
                    if a in rep.host:
                        rep.host.move_to_end(a)
                    else:
                        cost += costs.store_read_ms
                        st["store_reads"] += counted
                    st["loads"] += counted
                    rep.reader_free_ms = max(now, rep.reader_free_ms) + cost
                    push(rep.reader_free_ms, "loaded", r, a)
        if not rep.busy:
            start_step(r, now)

    measured = reqs[first:]
    end = max((q.finish_ms for q in reqs if q.finish_ms is not None), default=t0)
    ttft = [q.first_token_ms - q.job.arrival_ms for q in measured if q.first_token_ms is not None]
    per_rep = [rep.tokens for rep in reps]
    k = 1000 / max(1, len(measured))
    stats = {"policy": policy, "replicas": fleet.replicas, "slots": fleet.slots, "max_running": fleet.max_running,
             "host": fleet.host, "requests": len(jobs), "measured_requests": len(measured),
             "loads_per_1k": st["loads"] * k, "store_reads_per_1k": st["store_reads"] * k,
             "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
             "tokens_per_s_per_replica": st["window_tokens"] / max(1e-9, end - t0) * 1000 / fleet.replicas,
             "mean_batch_distinct": sum(steps_distinct) / max(1, len(steps_distinct)),
             "mean_batch_rows": sum(steps_rows) / max(1, len(steps_rows)),
             "replica_token_imbalance": max(per_rep) / max(1e-9, sum(per_rep) / len(per_rep)),
             "bound_excess_max": bound_excess, "output_tokens": sum(per_rep),
             "unfinished": sum(q.finish_ms is None for q in reqs), "sim_end_s": end / 1000}
    return stats, reqs


# ---------------------------------------------------------------- report
def _f(v, digits=1):
    return "—" if v is None else f"{v:,.{digits}f}"


def conclusion(rows: list[dict]) -> list[str]:
    """Which policy wins what, and the one these numbers recommend (most wins on device
    loads plus TTFT p99 over the s values; ties: fewer loads)."""
    by = {(r["policy"], r["zipf_s"]): r for r in rows}
    ss, pols = sorted({r["zipf_s"] for r in rows}), list(dict.fromkeys(r["policy"] for r in rows))
    out, score = [], Counter()
    for metric, label in (("loads_per_1k", "fewest device loads"), ("ttft_p99_ms", "lowest TTFT p99"),
                          ("store_reads_per_1k", "fewest store reads"),
                          ("mean_batch_distinct", "fewest distinct adapters per step")):
        wins = Counter(min(pols, key=lambda p: by[(p, s)][metric] or math.inf) for s in ss)
        if metric in ("loads_per_1k", "ttft_p99_ms"):
            score.update(wins)
        out.append(f"- {label}: " + ", ".join(f"{p} at {n} of {len(ss)} s values" for p, n in wins.most_common()))
    mean = {p: sum(by[(p, s)]["loads_per_1k"] for s in ss) / len(ss) for p in pols}
    best = max(pols, key=lambda p: (score[p], -mean[p]))
    others = ", ".join(f"{p} {mean[p]:.0f}" for p in pols if p != best)
    p99 = ", ".join(f"{p} {max(by[(p, s)]['ttft_p99_ms'] for s in ss) / 1e3:.1f} s" for p in pols)
    out.append(f"- **Recommended by these numbers for `polyadapter serve --replicas`: {best}** "
               f"({score[best]} of {2 * len(ss)} wins on device loads and TTFT p99; mean device loads per 1k "
               f"requests {mean[best]:.0f} against {others}; worst TTFT p99 over s: {p99}). The routers here "
               f"know every replica's load and loaded adapters exactly and at once; KV room is not modelled.")
    return out


def report(rows: list[dict], args, costs: Costs, md: Path, png: Path) -> None:
    fleet = rows[0]
    lines = [f"# Fleet simulation{' (quick)' if args.quick else ''}", "",
             (f"{fleet['replicas']} replicas x {fleet['slots']} device slots, at most {fleet['max_running']} running "
             f"requests each, host tier {fleet['host']} adapters; {args.adapters:,} adapters with Zipf popularity; "
             f"{rows[0]['requests']:,} requests per case (the first {args.warmup:.0%} are warm-up, not counted), "
             f"prompts 16-256 tokens, outputs 16-128; arrivals {'Poisson' if args.cv == 1 else f'Gamma, CV {args.cv}'} "
             f"at {args.load:.0%} of the fleet's capacity without routing affinity (per s); seed {args.seed}; "
             f"bounded-load c = {args.c}. Measured by `python bench/fleet_sim.py{' --quick' if args.quick else ''}`."),
             "", f"Costs ({costs.source}): " + ", ".join(f"{k} {v:.3g}" for k, v in asdict(costs).items()
                                                           if k != "source") + ".", "",
             ("| policy | Zipf s | loads / 1k req | store reads / 1k | TTFT p50 / p99 s | tok/s per replica | "
              "distinct adapters per step | rows per step |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['zipf_s']} | {_f(r['loads_per_1k'])} | {_f(r['store_reads_per_1k'])} | "
                     f"{_f(r['ttft_p50_ms'] / 1e3, 2)} / {_f(r['ttft_p99_ms'] / 1e3, 2)} | "
                     f"{_f(r['tokens_per_s_per_replica'])} | {_f(r['mean_batch_distinct'], 2)} | "
                     f"{_f(r['mean_batch_rows'])} |")
    lines += ["", "Result of this simulation (not a claim about real clusters):"] + conclusion(rows)
    md.write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for p in POLICIES:
        mine = sorted((r for r in rows if r["policy"] == p), key=lambda r: r["zipf_s"])
        xs = [r["zipf_s"] for r in mine]
        axes[0].plot(xs, [r["loads_per_1k"] for r in mine], marker="o", label=p)
        axes[1].plot(xs, [r["ttft_p99_ms"] / 1e3 for r in mine], marker="o", label=p)
    axes[0].set(xlabel="Zipf s", ylabel="adapter loads per 1,000 requests", title="device-slot misses")
    axes[1].set(xlabel="Zipf s", ylabel="TTFT p99 (s)", yscale="log", title="time to first token, p99")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3,000 requests per case")
    ap.add_argument("--requests", type=int, default=None, help="requests per case (default 20,000; quick 3,000)")
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--zipf", default="0.8,1.0,1.2,1.5", help="comma-separated Zipf exponents")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--max-running", type=int, default=32)
    ap.add_argument("--host", type=int, default=256)
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of capacity")
    ap.add_argument("--cv", type=float, default=1.0, help="arrival burstiness: 1 = Poisson, else Gamma")
    ap.add_argument("--c", type=float, default=1.25, help="bounded-load factor of hash_bounded")
    ap.add_argument("--warmup", type=float, default=0.1, help="fraction of requests left out of the stats")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--costs", default=None, help="JSON file of cost fields (see the module docstring)")
    ap.add_argument("--from-bench", default=None, help="bench/out/serve_engine*.jsonl to derive costs from")
    args = ap.parse_args(argv)
    from tqdm import tqdm
    costs = costs_from_json(args.costs) if args.costs else costs_from_bench(args.from_bench) if args.from_bench else Costs()
    fleet = Fleet(replicas=args.replicas, slots=args.slots, max_running=args.max_running, host=args.host)
    n = args.requests or (3_000 if args.quick else 20_000)
    cases = [(float(s), p) for s in args.zipf.split(",") for p in args.policies.split(",")]
    rows, jobs_by_s = [], {}
    for s, policy in tqdm(cases, desc="fleet_sim", file=sys.stderr):
        if s not in jobs_by_s:
            probs = zipf_probs(args.adapters, s)
            rate = args.load * fleet.replicas * capacity_rps(costs, fleet, probs, (16, 256), (16, 128))
            jobs_by_s[s] = (rate, workload(n, probs, rate, args.cv, args.seed))
        rate, jobs = jobs_by_s[s]
        stats, _ = simulate(jobs, policy, fleet, costs, seed=args.seed, c=args.c, warmup=args.warmup)
        row = {"case": f"{policy}_s{s}", "zipf_s": s, "adapters": args.adapters, "rate_rps": rate, **stats}
        rows.append(row)
        print(json.dumps(row), flush=True)
    OUT_DIR.mkdir(exist_ok=True)
    name = "fleet_sim_quick" if args.quick else "fleet_sim"
    report(rows, args, costs, OUT_DIR / f"{name}.md", OUT_DIR / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
