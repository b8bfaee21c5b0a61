"""Weight-space and routing operations over adapters: merge, combine, compress, route.

Every operation reads adapters from an ``AdapterModel`` and writes its result as an
ordinary adapter (installed on the same model, with its provenance: which adapters,
which method, which weights), so the result saves, loads, exports and runs in mixed
batches like any other.

- ``factors``: read LoRA factors and weight updates site by site; install new LoRAs.
"""
