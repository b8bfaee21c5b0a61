"""Serving many adapters over one base model. So far: per-request sampling
(``sampling.py``); the engine, scheduler, KV cache and adapter pool come next."""
from .sampling import RowStream, SamplingParams, find_stop, sample

__all__ = ["SamplingParams", "RowStream", "sample", "find_stop"]
