"""Weight-space and routing operations over adapters: merge, combine, compress, route.

Every operation reads adapters from an ``AdapterModel`` and writes its result as an
ordinary adapter (installed on the same model, with its provenance: which adapters,
which method, which weights), so the result saves, loads, exports and runs in mixed
batches like any other.

- ``factors``: read LoRA factors and weight updates site by site; install new LoRAs.
- ``combine``: linear, cat, task arithmetic, SVD, TIES, DARE, magnitude pruning (PEFT's
  ``add_weighted_adapter`` semantics, checked against it).
- ``compress``: SVD rank reduction (by rank or kept energy) and ComPEFT.
- ``shared_basis``: many LoRAs into one shared basis plus a small matrix each.
- ``lorahub``: gradient-free search of combination weights from a few examples.

Merging into the base lives on the model (``AdapterModel.merge_adapter(*names)``,
``merge_and_unload``); routing methods (Arrow, Poly/MHR) are adapter methods under
``polyadapter.methods``.
"""
