"""Which requests run in the next step, and how many of their tokens.

Two queues: ``waiting`` (admitted in arrival order) and ``running``. Every step:

1. each running request that is decoding gets one token;
2. running requests still prefilling get a chunk of their prompt (``chunk_size``
   at most) while the step's token budget lasts;
3. waiting requests join while there is budget, a free sequence slot and KV room,
   if their adapters are on the device (a request whose adapter is still loading is
   skipped, not waited for, so it never holds up the others).

KV blocks are taken as a request's context grows. When a decoding request needs a
block and none is free, the most recently admitted running request is preempted: its
blocks are freed and it goes back to the front of the queue, keeping its generated
tokens, to be recomputed later (as vLLM does by default).
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from .kv_cache import BlockAllocator
from .sampling import RowStream, SamplingParams

_IDS = itertools.count()


@dataclass(eq=False)
class Request:
    """One request: its tokens (placeholders for prompt tuning + prompt + generated so
    far), its setup, and where it stands."""

    prompt_ids: list[int]
    setup: object                 # as given (an adapter name, a block, a merge, None)
    params: SamplingParams
    prefix: int = 0               # placeholder tokens in front (prompt-tuning virtual tokens)
    id: str = ""
    tokens: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    computed: int = 0             # positions whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    row_setup: object = None      # the normalized setup the rows of this request run
    names: tuple = ()             # adapters it needs on the device, dependencies first
    stream: RowStream | None = None
    prompt_embeds: object = None  # (prefix, hidden) virtual-token embeddings, or None
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    admitted: int = -1            # admission order (preemption picks the latest)
    tried: bool = False           # asked the pool for its adapters at least once
    handle: object = None

    def __post_init__(self):
        if not self.id:
            self.id = f"req-{next(_IDS)}"
        if not self.tokens:
            self.tokens = [0] * self.prefix + list(self.prompt_ids)

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (1 when decoding)."""
        return len(self.tokens) - self.computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Work:
    request: Request
    start: int      # first position of this step's tokens
    count: int      # how many tokens

    @property
    def samples(self) -> bool:
        """Does this step reach the request's last token (so a new token is drawn)?"""
        return self.start + self.count == len(self.request.tokens)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int = 64, max_num_batched_tokens: int = 512,
                 chunk_size: int = 256):
        self.allocator = allocator
        self.max_num_seqs, self.budget, self.chunk_size = max_num_seqs, max_num_batched_tokens, chunk_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._admitted = itertools.count()
        self.preemptions = 0
        self.on_release = lambda request: None   # the engine unpins the request's adapters

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, ready) -> list[Work]:
        """This step's work; ``ready(request)`` says whether a waiting request's adapters
        are on the device (and pins them when it says yes)."""
        budget = self.budget
        work: list[Work] = []
        for r in sorted((r for r in self.running if r.remaining == 1), key=lambda r: r.admitted):
            if r not in self.running:  # preempted below to make room for an earlier one
                continue
            if not self._grow(r, 1):
                continue
            work.append(Work(r, r.computed, 1))
            budget -= 1
        for r in self.running:
            if r.remaining > 1 and budget > 0:
                n = min(r.remaining, budget, self.chunk_size)
                if self._grow(r, n, preempt=False):
                    work.append(Work(r, r.computed, n))
                    budget -= n
        skipped = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting.popleft()
            if r.finished:
                continue
            n = min(r.remaining, budget, self.chunk_size)
            if self.allocator.blocks_for(r.computed + n) - len(r.blocks) > self.allocator.num_free:
                self.waiting.appendleft(r)
                break
            if not ready(r):
                skipped.append(r)
                continue
            r.admitted = next(self._admitted)
            self.running.append(r)
            self._grow(r, n, preempt=False)
            work.append(Work(r, r.computed, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return work

    def _grow(self, r: Request, n: int, preempt: bool = True) -> bool:
        """Make room in ``r``'s block table for ``n`` more tokens, preempting the latest
        admitted other request while blocks are short (decode only)."""
        need = self.allocator.blocks_for(r.computed + n) - len(r.blocks)
        while need > self.allocator.num_free:
            # decodes are scheduled oldest first, so newer requests hold no work in this step yet
            victims = [v for v in self.running if v.admitted > r.admitted]
            if not preempt or not victims:
                if preempt:  # the newest and still no room: this request goes back itself
                    self.preempt(r)
                return False
            self.preempt(max(victims, key=lambda v: v.admitted))
        if need > 0:
            r.blocks += self.allocator.allocate(need)
        return True

    def preempt(self, r: Request) -> None:
        self.release(r)
        r.computed = 0
        self.preemptions += 1
        self.waiting.appendleft(r)

    def release(self, r: Request) -> None:
        """Free ``r``'s blocks and take it out of the running set."""
        self.allocator.free(r.blocks)
        r.blocks = []
        if r in self.running:
            self.running.remove(r)
            self.on_release(r)

    def finish(self, r: Request) -> None:
        self.release(r)
        try:
            self.waiting.remove(r)
        except ValueError:
            pass
