"""The serving engine: continuous batching over a Hugging Face causal LM in which
every request runs its own adapter, composition or merge.

    engine = Engine(pm, tokenizer)
    engine.register_adapter("support", "store:support")      # weights load on first use
    h = engine.submit("How do I reset my password?", "support", SamplingParams(max_tokens=64))
    for event in h:                 # or: async for event in h
        print(event.text, end="")
    h.result().finish_reason        # "stop" | "length" | "cancelled" | "error"

One thread owns the model. Each loop turn it takes new and cancelled requests from
the inbox, installs adapters the pool has read (between steps, never during one),
asks the scheduler for the step's work, builds the step plan once (``plan.build``),
runs the model once over the packed tokens, samples every request that reached its
last token, and streams tokens to the handles. ``submit`` returns at once.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..compose import ROW_LEVEL, Block, names_in, normalize, prompt_stack
from ..errors import ConfigError, PolyAdapterError, StateError
from ..sites import base_module
from . import kv_cache
from .kv_cache import AttentionPlan, BlockAllocator, PagedKV, Prefill, active_step
from .plan import StepPlan, build
from .pool import AdapterPool, Merge
from .sampling import RowStream, SamplingParams, find_stop, sample
from .scheduler import Request, Scheduler


@dataclass
class TokenEvent:
    token: int
    logprob: float
    text: str          # the new text this token completes ("" while it is held back)


@dataclass
class RequestOutput:
    id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    latency_s: float
    logprobs: list[float] = field(default_factory=list)
    error: str | None = None


class Handle:
    """A submitted request. Iterate it (sync or ``async for``) for :class:`TokenEvent`
    objects; ``result()`` waits for the :class:`RequestOutput`; ``cancel()`` stops it
    and frees its KV blocks on the engine's next turn."""

    def __init__(self, engine: Engine, request: Request, tokenizer):
        self._engine, self.request, self._tokenizer = engine, request, tokenizer
        self._events: list[TokenEvent] = []
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._text, self._sent = "", 0
        self.error: str | None = None
        self.done = False

    @property
    def id(self) -> str:
        return self.request.id

    def cancel(self) -> None:
        self._engine._inbox.put(("cancel", self))
        self._engine._wake.set()

    # -------------------------------------------------------------- engine side
    def _push(self, token: int, logprob: float) -> bool:
        """Record a token; True when a stop string ended the request."""
        r = self.request
        text, stopped = "", False
        if self._tokenizer is not None:
            full = self._tokenizer.decode(r.output, skip_special_tokens=True)
            cut = find_stop(full, r.params.stop, len(self._text))
            if cut is not None:
                full, stopped = full[:cut], True
            self._text = full
            hold = 0 if stopped else max((len(s) - 1 for s in r.params.stop), default=0)
            safe = len(full) - hold
            if full.endswith("\ufffd") and not stopped:  # an incomplete character: wait for the rest
                safe = min(safe, len(full) - 1)
            if safe > self._sent:
                text, self._sent = full[self._sent:safe], safe
        self._emit(TokenEvent(token, logprob, text))
        return stopped

    def _finish(self, reason: str, error: str | None = None) -> None:
        r = self.request
        r.finish_reason = r.finish_reason or reason
        r.finished_at = time.perf_counter()
        self.error = error
        if len(self._text) > self._sent:  # release the held-back tail
            self._emit(TokenEvent(-1, 0.0, self._text[self._sent:]))
            self._sent = len(self._text)
        with self._cond:
            self.done = True
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    def _emit(self, event: TokenEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)

    # -------------------------------------------------------------- caller side
    def _since(self, i: int) -> tuple[list[TokenEvent], int, bool]:
        """(the events after the first ``i`` worth yielding, the new count, done); under the lock."""
        events = [e for e in self._events[i:] if e.token >= 0 or e.text]
        return events, len(self._events), self.done

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                while i >= len(self._events) and not self.done:
                    self._cond.wait(timeout=1.0)
                events, i, done = self._since(i)
            yield from events
            if done:  # read under the same lock as the events: nothing comes after
                return

    async def __aiter__(self):
        loop, ev = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._waiters.append((loop, ev))
        i = 0
        try:
            while True:
                with self._cond:
                    events, i, done = self._since(i)
                    ev.clear()  # an event after this snapshot sets it again
                for e in events:
                    yield e
                if done:
                    return
                await ev.wait()
        finally:
            with self._cond:
                self._waiters.remove((loop, ev))

    def result(self, timeout: float | None = None) -> RequestOutput:
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout=timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        r = self.request
        return RequestOutput(r.id, list(r.output), self._text, r.finish_reason, len(r.prompt_ids), len(r.output),
                             None if r.first_token_at is None else r.first_token_at - r.arrival,
                             (r.finished_at or time.perf_counter()) - r.arrival, list(r.logprobs), self.error)

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self.result(timeout=0)


class Engine:
    """Serve ``pm`` (an AdapterModel over a Hugging Face causal LM).

    ``max_num_seqs``: requests in the running batch; ``max_num_batched_tokens``: tokens
    per step (decodes + prefill chunks); ``chunk_size``: the longest prefill chunk;
    ``kv_cache_tokens`` (or ``kv_cache_bytes``): KV capacity, in ``block_size`` blocks;
    ``device_slots``: adapters on the device at once (besides those installed before the
    engine started); ``host_bytes``: the host tier's budget; ``store``: a Store for
    ``store:`` sources. ``start=False`` runs no thread: call :meth:`step` yourself."""

    def __init__(self, pm, tokenizer=None, *, max_num_seqs: int = 64, max_num_batched_tokens: int = 1024,
                 chunk_size: int = 512, block_size: int = 16, kv_cache_tokens: int | None = None,
                 kv_cache_bytes: int = 1 << 30, device_slots: int = 16, host_bytes: int = 4 << 30,
                 store=None, seed: int = 0, max_lora_rank: int | None = None, start: bool = True):
        from ..model import AdapterModel
        if not isinstance(pm, AdapterModel):
            raise ConfigError(f"Engine needs an AdapterModel; found {type(pm).__name__}")
        model = pm.model
        for attr in ("config", "get_input_embeddings", "get_output_embeddings"):
            if not hasattr(model, attr):
                raise ConfigError(f"Engine needs a Hugging Face causal LM; {type(model).__name__} has no {attr}")
        if pm.state.merged:
            raise StateError(f"adapter {sorted(pm.state.merged)[0]!r} is merged into the base; the engine serves "
                             f"every request from the same base, so unmerge it first")
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens),
                            ("chunk_size", chunk_size), ("block_size", block_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"Engine: {name}={value!r} must be a positive integer")
        if max_num_batched_tokens < max_num_seqs:
            raise ConfigError(f"Engine: max_num_batched_tokens={max_num_batched_tokens} must be at least "
                              f"max_num_seqs={max_num_seqs} (every running request decodes one token a step)")
        self.pm, self.tokenizer = pm, tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        kv_cache.register()
        self.eos = _eos_ids(model, tokenizer)
        self.max_model_len = _max_len(model.config)
        self.pool = AdapterPool(pm, device_slots=device_slots, host_bytes=host_bytes, store=store,
                                max_rank=max_lora_rank)
        per_token = self._probe_kv_bytes()
        tokens = kv_cache_tokens or max(block_size, kv_cache_bytes // per_token)
        self.num_blocks = max(1, tokens // block_size)
        self.kv = PagedKV(self.num_blocks, block_size, self.dtype, self.device)
        self.allocator = BlockAllocator(self.num_blocks, block_size)
        self.scheduler = Scheduler(self.allocator, max_num_seqs, max_num_batched_tokens, chunk_size)
        self.scheduler.on_release = lambda r: self.pool.release(r.names)
        self.pool.on_loaded = lambda: self._wake.set()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.steps = 0
        self.step_adapters: deque[frozenset] = deque(maxlen=100_000)  # adapters the recent steps ran
        self._epoch_key, self._epoch_tensors = None, []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = None
        if start:
            self._thread = threading.Thread(target=self._loop, name="polyadapter-engine", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ public API
    def register_adapter(self, name: str, source) -> None:
        """Register ``name`` from a folder, ``store:REF`` or a :class:`Merge`; no
        weights are read until a request needs it."""
        self.pool.register(name, source)

    def unregister_adapter(self, name: str, timeout: float = 30) -> None:
        """Forget ``name`` (its device slot and host copy too), between two steps; refused
        (PolyAdapterError) while requests use it or other adapters build on it."""
        if self._thread is None or not self._thread.is_alive():
            self.pool.unregister(name)
            return
        done: Future = Future()
        self._inbox.put(("unregister", (name, done)))
        self._wake.set()
        done.result(timeout)

    @property
    def healthy(self) -> bool:
        """The engine runs (not closed, its loop not stopped by an error)."""
        return not self._closed and self._error is None and (self._thread is None or self._thread.is_alive())

    def adapters(self) -> dict[str, str]:
        """Every registered adapter's name and where it comes from (a folder, ``store:REF``,
        ``merge`` or ``resident``)."""
        out = {}
        for name, src in list(self.pool.sources.items()):
            out[name] = {"folder": str(src.ref), "store": f"store:{src.ref}"}.get(src.kind, src.kind)
        return out

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """(adapters the running requests use, adapters waiting requests ask for)."""
        running = sorted({n for r in list(self.scheduler.running) for n in r.names})
        waiting = sorted({n for r in list(self.scheduler.waiting) for n in r.names})
        return running, waiting

    def submit(self, prompt, setup=None, sampling: SamplingParams | None = None, request_id: str = "") -> Handle:
        """Queue a request and return its :class:`Handle` at once. ``prompt``: text
        (needs the tokenizer) or a list of token ids. ``setup``: an adapter name, a
        block (Stack, Average, Fuse), a :class:`Merge` or LoRAX's ``merged_adapters``
        dict, or None for the base."""
        if self._closed:
            raise StateError("the engine is closed")
        if self._error is not None:
            raise StateError(f"the engine stopped after an error: {self._error!r}")
        params = sampling or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ConfigError(f"sampling must be a SamplingParams; found {type(params).__name__}")
        ids = self._token_ids(prompt)
        setup = self._resolve_setup(setup)
        names = self.pool.closure(names_in(setup))
        outside = [n for n in names if n not in self.pool.resident]
        if len(outside) > self.pool.device_slots:
            raise ConfigError(f"setup {setup!r} needs {len(outside)} adapters on the device at once, more than "
                              f"device_slots={self.pool.device_slots}")
        prefix = sum(self.pool.sources[n].virtual_tokens for n in names)
        total = prefix + len(ids) + params.max_tokens
        if self.max_model_len and total > self.max_model_len:
            raise ConfigError(f"request needs {total} positions ({prefix} virtual + {len(ids)} prompt + "
                              f"{params.max_tokens} max_tokens) but the model's context is {self.max_model_len}")
        if self.allocator.blocks_for(total) > self.num_blocks:
            raise ConfigError(f"request needs {total} tokens of KV cache but the engine holds "
                              f"{self.num_blocks * self.block_size}")
        r = Request(ids, setup, params, prefix=prefix, id=request_id)
        r.names = tuple(names)
        r.stream = RowStream(params, self.generator, self.device)
        handle = r.handle = Handle(self, r, self.tokenizer)
        self._inbox.put(("submit", r))
        self._wake.set()
        return handle

    def generate(self, prompts: list, setups: list | None = None, sampling=None, timeout: float = 600):
        """Submit every prompt (with its setup) and wait for all outputs, in order."""
        setups = setups if setups is not None else [None] * len(prompts)
        params = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        handles = [self.submit(p, s, sp) for p, s, sp in zip(prompts, setups, params)]
        deadline = time.monotonic() + timeout
        if self._thread is None:  # no engine thread: step here (a moment's sleep while adapters are read)
            while not all(h.done for h in handles):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"generate: requests still running after {timeout} s")
                if not self.step():
                    time.sleep(0.001)
        return [h.result(timeout=max(0.0, deadline - time.monotonic())) for h in handles]

    def metrics(self) -> dict:
        s = self.pool.stats
        return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                "kv_blocks_total": self.num_blocks, "kv_blocks_used": self.num_blocks - self.allocator.num_free,
                "steps": self.steps, "preemptions": self.scheduler.preemptions,
                "pool_hits": s.hits, "pool_misses": s.misses, "pool_loads": s.loads, "pool_installs": s.installs,
                "pool_evictions": s.evictions, "adapters_on_device": len(self.pool.device) + len(self.pool.resident),
                "adapters_registered": len(self.pool.sources)}

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.pool.close()
        self._end_all("cancelled")

    def _end_all(self, reason: str, error: str | None = None) -> None:
        for r in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.finish(r)
            r.handle._finish(reason, error)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the loop
    def run(self, stop: threading.Event | None = None) -> None:
        """The step loop in the calling thread, for an engine made with ``start=False``:
        serves submitted requests until :meth:`close` is called or ``stop`` is set.
        Computing in the thread that loaded the model is faster on CPU (see
        :func:`start_in_thread`); other threads submit and read handles meanwhile."""
        if self._thread is not None and self._thread is not threading.current_thread():
            raise StateError(f"this engine already runs its loop in thread {self._thread.name!r}")
        self._loop(stop)
        if self._error is not None:
            raise self._error

    def _loop(self, stop: threading.Event | None = None) -> None:
        while not self._closed and not (stop is not None and stop.is_set()):
            try:
                busy = self.step()
            except BaseException as e:  # noqa: BLE001 - fail every request, keep the reason
                self._error = e
                self._end_all("error", f"{type(e).__name__}: {e}")
                return
            if not busy:
                self._wake.wait(timeout=0.05)
                self._wake.clear()

    def step(self) -> bool:
        """One turn: inbox, adapter installs, one model step. False when idle."""
        self._drain_inbox()
        self.pool.install_ready()
        self._fail_unloadable()
        if not self.scheduler.has_work():
            return False
        work = self.scheduler.schedule(self._ready)
        if not work:  # waiting on adapter reads: the pool wakes the loop when one finishes
            return False
        if len(work) > 1:  # rows in bank-slot order: the segment kernels gather and scatter nothing
            ranks = {n: self.pool.slot_rank(n) for n in {w.request.names[0] if w.request.names else None
                                                          for w in work}}
            work.sort(key=lambda w: ranks[w.request.names[0] if w.request.names else None])
        plan = build(work, self.kv, self.block_size, self.device)
        logits = self._forward(plan)
        for w in work:
            w.request.computed = w.start + w.count
        self._sample(plan, logits)
        self.steps += 1
        self.step_adapters.append(frozenset(n for w in work for n in w.request.names))
        return True

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                self.scheduler.add(item)
                self.pool.prefetch(item.names)
            elif kind == "cancel":
                r = item.request
                if not r.finished:
                    self.scheduler.finish(r)
                    item._finish("cancelled")
            elif kind == "unregister":
                name, done = item
                try:
                    self.pool.unregister(name)
                except BaseException as e:  # handed to the caller's thread
                    done.set_exception(e)
                else:
                    done.set_result(None)

    def _fail_unloadable(self) -> None:
        if not self.pool.failed:
            return
        for r in list(self.scheduler.waiting):
            bad = [self.pool.failed[n] for n in r.names if n in self.pool.failed]
            if bad:
                self.scheduler.finish(r)
                r.handle._finish("error", bad[0])

    def _ready(self, r: Request) -> bool:
        first, r.tried = not r.tried, True
        if not self.pool.acquire(r.names, first=first):
            return False
        if r.row_setup is None and r.setup is not None:
            try:
                r.row_setup = normalize(r.setup, self.pm.state, top=False)
                prompts = prompt_stack(r.row_setup, self.pm.state)
                if prompts:
                    parts = [self.pm.input_parts[n].embeddings for n in reversed(prompts)]
                    r.prompt_embeds = torch.cat(parts).detach().to(self.device, self.dtype)
            except PolyAdapterError as e:
                self.pool.release(r.names)
                r.finish_reason = "error"
                r.handle._finish("error", str(e))
                return False
        return True

    def _forward(self, plan: StepPlan) -> torch.Tensor:
        model, state = self.pm.model, self.pm.state
        hooks = [model.get_output_embeddings().register_forward_pre_hook(
            lambda module, args: self._logit_rows(plan, args))]
        if plan.prompt_rows is not None:
            hooks.append(model.get_input_embeddings().register_forward_hook(
                lambda module, args, out: out.index_copy(0, plan.prompt_rows,
                                                         plan.prompt_embeds[:, None, :].to(out.dtype))))
        try:
            with _paged_run(model, state, plan.attention, plan.rows, self._adapter_epoch()):
                out = model(input_ids=plan.input_ids, position_ids=plan.position_ids, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :]

    def _adapter_epoch(self) -> int:
        """A number that changes whenever an adapter tensor changes in place: the sum of
        their version counters (which only grow). Lets the banks skip per-site checks."""
        key = tuple(self.pm.state.adapters), self.pool.stats.installs, self.pool.stats.evictions
        if self._epoch_key != key:
            self._epoch_key = key
            self._epoch_tensors = [t for n in self.pm.adapters for part in self.pm.parts(n).values()
                                   for t in list(part.parameters()) + list(part.buffers())]
        return sum(t._version for t in self._epoch_tensors)

    def _logit_rows(self, plan: StepPlan, args: tuple):
        """Before the output layer: only the rows that draw a token go through it."""
        self.pm.state.rows = plan.sample_rows
        return (args[0].index_select(0, plan.sample_index),) + tuple(args[1:])

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> None:
        if not plan.sampled:
            return
        tokens, logprobs = sample(logits, [r.params for r in plan.sampled], [r.stream for r in plan.sampled])
        now = time.perf_counter()
        for r, t, lp in zip(plan.sampled, tokens.tolist(), logprobs.tolist()):
            r.tokens.append(t)
            r.output.append(t)
            if r.params.logprobs:
                r.logprobs.append(lp)
            if r.first_token_at is None:
                r.first_token_at = now
            stopped = r.handle._push(t, lp)
            reason = None
            if stopped or t in r.params.stop_token_ids or (t in self.eos and not r.params.ignore_eos):
                reason = "stop"
            elif len(r.output) >= r.params.max_tokens:
                reason = "length"
            if reason:
                self.scheduler.finish(r)
                r.handle._finish(reason)

    # ------------------------------------------------------------------ helpers
    def _token_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("a text prompt needs the engine's tokenizer; pass token ids or a tokenizer")
            ids = self.tokenizer(prompt)["input_ids"]
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.flatten().tolist()
        else:
            ids = list(prompt)
        weight = getattr(base_module(self.pm.model.get_input_embeddings()), "weight", None)
        vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else None
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ConfigError("the prompt must be non-empty text or a non-empty list of token ids (ints >= 0)")
        if vocab is not None and max(ids) >= vocab:
            raise ConfigError(f"prompt token id {max(ids)} is not below the vocabulary size {vocab}")
        return ids

    def _resolve_setup(self, setup):
        if isinstance(setup, dict):
            setup = Merge.from_lorax(setup.get("merged_adapters", setup))
        if isinstance(setup, Merge):
            return self.pool.merge_source(setup)
        if isinstance(setup, ROW_LEVEL):
            raise ConfigError(f"{type(setup).__name__} acts on a whole batch; a request's setup is an adapter "
                              f"name, a Stack/Average/Fuse block, a merge or None")
        if setup is not None and not isinstance(setup, (str, Block)):
            raise ConfigError(f"a request's setup is an adapter name, a block, a merge or None; found "
                              f"{type(setup).__name__}")
        return setup

    def _probe_kv_bytes(self) -> int:
        """KV bytes per token, measured by one one-token step through the paged attention
        (so no architecture-specific config field is read)."""
        probe = PagedKV(1, self.block_size, self.dtype, self.device)
        attention = AttentionPlan(probe, 1, torch.zeros(1, dtype=torch.long, device=self.device), None, None, None,
                                  [Prefill(0, 1, None, None)])
        model = self.pm.model
        with _paged_run(model, self.pm.state, attention, rows=None):  # the bare base
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device),
                  position_ids=torch.zeros(1, 1, dtype=torch.long, device=self.device), use_cache=False)
        if not probe.layers:
            raise ConfigError(f"{type(model).__name__} called no attention layer through transformers' attention "
                              f"interface, so the engine cannot page its KV cache")
        return max(1, probe.bytes_used() // self.block_size)


def start_in_thread(build, name: str = "polyadapter-engine"):
    """Calls ``build()`` in a new thread, which then runs the loop of the engine it
    returned (an :class:`Engine` made with ``start=False``, or a tuple whose first item
    is one); returns what ``build`` returned once it has returned, or raises what it
    raised.

    Why: load the model inside ``build``, so the thread that loaded it is the one that
    computes. On CPU, torch's OpenMP runtime (libgomp) keeps a team of worker threads for
    every thread that ran parallel work; once the workers of all teams outnumber the
    cores, idle workers stop spinning and every parallel operation pays a wake-up.
    Measured on this 2-core machine: an engine thread serving a model loaded in another
    thread ran at 0.8x the speed of one that loaded it itself, and small matmuls (the
    LoRA updates) took 60-90 us instead of 8-12 us."""
    box: dict = {}
    ready = threading.Event()

    def target():
        try:
            out = build()
            engine = out[0] if isinstance(out, tuple) else out
            if not isinstance(engine, Engine) or engine._thread is not None:
                raise ConfigError("start_in_thread: build() must return an Engine made with start=False "
                                  f"(or a tuple starting with one); found {type(engine).__name__}")
            engine._thread = threading.current_thread()
            box["out"] = out
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e
            return
        finally:
            ready.set()
        engine._loop()

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    ready.wait()
    if "error" in box:
        raise box["error"]
    return box["out"]


@contextmanager
def _paged_run(model, state, attention: AttentionPlan, rows, epoch: int | None = None):
    """While the block runs, ``model``'s attention layers go through the paged cache
    with ``attention``'s plan, and its sites read ``rows`` (None and no setup: the bare
    base); everything is restored afterwards."""
    saved = model.config._attn_implementation, state.rows, state.setup, state.bank_epoch
    model.config._attn_implementation = kv_cache.ATTENTION
    state.rows, state.setup, state.bank_epoch = rows, None, epoch
    try:
        with torch.no_grad(), active_step(attention):
            yield
    finally:
        model.config._attn_implementation = saved[0]
        state.rows, state.setup, state.bank_epoch = saved[1:]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _max_len(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
