"""Per-request sampling for a batch of next-token logits, in one vectorised step.

Every row of a step may ask for something else — greedy, a temperature, top-k,
top-p, its own seed — and all rows are sampled together: one sort of the logits for
top-k/top-p, one softmax, then one draw per row from its own random stream. A seeded
request draws from a generator of its own, so its tokens do not depend on which other
requests share its steps (the serving engine's batches change at every step).

    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1, stop=("\\n\\n",))
    streams = [RowStream(params) for params in batch_params]
    tokens, logprobs = sample(logits, batch_params, streams)

Log-probabilities are those of the model's own distribution (``log_softmax`` of the
raw logits) at the chosen token, as vLLM reports them by default.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 is greedy. ``top_k`` 0 and ``top_p`` 1 turn those filters off.
    ``seed``: a private random stream for this request (None: the engine's shared one).
    ``stop_token_ids`` end the request when generated (the token is kept); ``stop``
    strings end it where they first appear in the text (the string is cut off).
    ``ignore_eos`` keeps generating past the end-of-sequence token (benchmarks)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        _require(_is_int(self.max_tokens) and 1 <= self.max_tokens <= 1_000_000, "max_tokens", self.max_tokens,
                 "an integer from 1 to 1,000,000")
        _require(_is_number(self.temperature) and 0 <= self.temperature <= 100, "temperature", self.temperature,
                 "a number from 0 (greedy) to 100")
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        _require(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an integer >= 0 (0: off)")
        _require(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63), "seed", self.seed,
                 "None or an integer from 0 to 2**63 - 1")
        _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", self.stop_token_ids,
                 "a list of token ids (integers >= 0)")
        _require(all(isinstance(s, str) and s for s in self.stop) and len(self.stop) <= 16, "stop", self.stop,
                 "up to 16 non-empty strings")
        _require(isinstance(self.logprobs, bool), "logprobs", self.logprobs, "true or false")
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "true or false")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, field: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"sampling parameter {field}={value!r} is invalid; expected {expected}")


class RowStream:
    """One request's source of randomness: its own seeded generator, or the shared one."""

    def __init__(self, params: SamplingParams, shared: torch.Generator | None = None, device="cpu"):
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        else:
            self.generator = shared


def sample(logits: torch.Tensor, params: list[SamplingParams],
           streams: list[RowStream]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row, its log-probability under the model) for ``logits`` (rows, vocab)."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(streams) != len(params):
        raise ConfigError(f"sample: logits of shape {tuple(logits.shape)} need one SamplingParams and one "
                          f"stream per row; found {len(params)} and {len(streams)}")
    logits = logits.float()
    raw_logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        tokens[index] = _draw(logits.index_select(0, index), [params[i] for i in rows], [streams[i] for i in rows])
    return tokens, raw_logprobs.gather(1, tokens[:, None]).squeeze(1)


def _draw(logits: torch.Tensor, params: list[SamplingParams], streams: list[RowStream]) -> torch.Tensor:
    """Sample the non-greedy rows: temperature, then top-k and top-p on one sort."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)
    scaled = logits / temperature[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=device)[None, :]
    k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=device)
    keep = ranks < k[:, None]
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    before = probs.cumsum(dim=-1) - probs          # mass of the tokens ranked above each one
    keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1)  # the smallest prefix reaching top_p
    probs = torch.softmax(ordered.masked_fill(~keep, float("-inf")), dim=-1)
    # One uniform per row from the row's own stream, then inverse-CDF on the sorted probs:
    # a seeded row's draws depend on its own generator only, whatever else is in the batch.
    u = torch.stack([torch.rand((), generator=s.generator, device=device) for s in streams])
    pick = torch.searchsorted(probs.cumsum(dim=-1), u[:, None]).clamp_(max=vocab - 1)
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)  # rounding never leaves the kept set
    return order.gather(1, pick).squeeze(1)


def find_stop(text: str, stops: tuple[str, ...], searched: int = 0) -> int | None:
    """Index in ``text`` where the first stop string begins, or None. ``searched``: how
    much of ``text`` was already checked (a stop may straddle the boundary, so the
    search starts that far back minus the longest stop)."""
    if not stops:
        return None
    start = max(0, searched - max(len(s) for s in stops) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None
