"""Serving many adapters over one base model: the engine (continuous batching with a
paged KV cache and an adapter pool), its scheduler, step plan and sampler.

    from polyadapter.serve import Engine, SamplingParams
    engine = Engine(pm, tokenizer)
    handle = engine.submit("Hello", "my-adapter", SamplingParams(max_tokens=32))
"""
from .engine import Engine, Handle, RequestOutput, TokenEvent, start_in_thread
from .pool import AdapterPool, Merge
from .sampling import RowStream, SamplingParams, find_stop, sample

__all__ = ["Engine", "start_in_thread", "Handle", "RequestOutput", "TokenEvent", "AdapterPool", "Merge",
           "SamplingParams", "RowStream", "sample", "find_stop"]
