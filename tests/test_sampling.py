"""Per-request sampling in one vectorised step: greedy, temperature, top-k, top-p,
seeds independent of the batch, log-probabilities, stop strings, and clear refusals."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polyadapter as pa
from polyadapter.serve import RowStream, SamplingParams, find_stop, sample


def logits_for(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def draw(logits, params, shared_seed=0):
    shared = torch.Generator().manual_seed(shared_seed)
    return sample(logits, params, [RowStream(p, shared) for p in params])


def test_greedy_and_top_k_1_are_the_argmax_with_the_models_logprobs():
    x = logits_for(4)
    tokens, lp = draw(x, [SamplingParams(temperature=0), SamplingParams(top_k=1), SamplingParams(temperature=0),
                          SamplingParams(temperature=0, top_p=0.1)])
    assert torch.equal(tokens, x.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(x, -1).gather(1, tokens[:, None]).squeeze(1))


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch():
    x = logits_for(1, seed=3)
    me = SamplingParams(temperature=0.9, top_p=0.95, top_k=20, seed=42)
    alone = [int(draw(x, [me])[0][0]) for _ in range(5)]  # a fresh stream each time: same first token
    assert len(set(alone)) == 1
    stream = RowStream(me)
    seq_alone = [int(sample(x, [me], [stream])[0][0]) for _ in range(20)]
    stream, other = RowStream(me), RowStream(SamplingParams(temperature=1.5), torch.Generator().manual_seed(9))
    both = torch.cat([x, logits_for(1, seed=8)])
    seq_mixed = [int(sample(both, [me, SamplingParams(temperature=1.5)], [stream, other])[0][0]) for _ in range(20)]
    assert seq_alone == seq_mixed


@settings(max_examples=60, deadline=None)
@given(top_k=st.integers(0, 10), top_p=st.floats(0.05, 1.0), temperature=st.floats(0.1, 3.0),
       seed=st.integers(0, 2**31))
def test_samples_stay_in_the_top_k_and_the_nucleus(top_k, top_p, temperature, seed):
    x = logits_for(1, seed=seed % 100)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    token = int(draw(x, [params])[0][0])
    probs = torch.softmax(x[0] / temperature, -1)
    order = probs.argsort(descending=True)
    rank = int((order == token).nonzero())
    if top_k:
        assert rank < top_k
    kept = probs[order]
    if top_k:
        kept = kept[:top_k] / kept[:top_k].sum()
    assert float(kept[:rank].sum()) < top_p + 1e-6  # the mass ranked above it is below top_p


def test_temperature_sampling_follows_the_distribution():
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.0, seed=0)
    stream = RowStream(params)
    n = 4000
    counts = torch.bincount(torch.stack([sample(x, [params], [stream])[0][0] for _ in range(n)]), minlength=4)
    expected = torch.softmax(x[0], -1) * n
    assert ((counts - expected).abs() < 5 * expected.sqrt() + 5).all(), (counts, expected)


def test_find_stop_across_chunks():
    assert find_stop("hello world", ("wor",)) == 6
    assert find_stop("hello", ("xyz",)) is None
    text = "abc\n\nrest"
    assert find_stop(text, ("\n\n", "rest"), searched=4) == 3  # the stop straddles what was searched
    assert find_stop("anything", ()) is None


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", "1"), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("top_k", 2.5), ("max_tokens", 0), ("max_tokens", True), ("seed", -1),
    ("stop_token_ids", [-3]), ("stop", [""]), ("logprobs", 1),
])
def test_bad_sampling_values_name_the_field(field, value):
    with pytest.raises(pa.ConfigError, match=f"{field}="):
        SamplingParams(**{field: value})


def test_sample_checks_its_arguments():
    with pytest.raises(pa.ConfigError, match="one SamplingParams"):
        draw(logits_for(2), [SamplingParams()])
