"""The adapter store: a local library of adapters (SQLite index + content-addressed
safetensors blobs) with versions, aliases, tags, search, lineage and integrity checks.

    from polyadapter.store import Store
    store = Store.init()                                   # $POLYADAPTER_HOME/store or ~/.cache/...
    store.add("runs/bbc/adapter", name="bbc", tags=["news"])
    store.load_into(pm, "bbc")                             # or "bbc@2", "bbc@prod"

See ``store.py`` for the API and the rules that keep it safe under crashes and
concurrent writers, ``schema.py`` for the tables, ``blobs.py`` for the weight files.
"""
from .schema import SCHEMA_VERSION
from .store import (
    STORE_PREFIX,
    GcReport,
    IntegrityError,
    InUseError,
    InvalidNameError,
    ModelShapes,
    NotFoundError,
    Ref,
    SchemaError,
    Store,
    StoreError,
    StoreNotFoundError,
    VerifyReport,
    Version,
    check_name,
    default_store_path,
    fits,
    is_store_ref,
    load_from_store,
    model_shapes,
    native_meta,
    parse_ref,
    save_to_store,
)

__all__ = [
    "SCHEMA_VERSION",
    "STORE_PREFIX",
    "GcReport",
    "InUseError",
    "IntegrityError",
    "InvalidNameError",
    "ModelShapes",
    "NotFoundError",
    "Ref",
    "SchemaError",
    "Store",
    "StoreError",
    "StoreNotFoundError",
    "VerifyReport",
    "Version",
    "check_name",
    "default_store_path",
    "fits",
    "is_store_ref",
    "load_from_store",
    "model_shapes",
    "native_meta",
    "parse_ref",
    "save_to_store",
]
