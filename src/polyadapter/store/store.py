"""The adapter store: a local library of adapters, with versions, aliases, tags, search,
lineage, import/export and integrity checks.

    store = Store.init("~/adapters")                  # or Store() for the default location
    v = store.add("runs/bbc/adapter", name="bbc", tags=["news"], alias="prod")   # bbc@1
    store.load_into(pm, "bbc@prod")                   # hash-checked, then fully checked by load_from
    store.search("news accuracy"); store.list(method="lora", compatible_with=model)

Layout of a store folder::

    index.sqlite (+ -wal, -shm)    versions, aliases, tags, lineage, search index (schema.py)
    blobs/ab/abcdef...             safetensors weights, named by their sha256 (blobs.py)
    tmp/                           blobs being written; stale ones are removed by gc

Rules that make it safe (each is tested in tests/test_store_reliability.py):
- every write is ONE transaction taken with ``BEGIN IMMEDIATE`` (the write lock first, so two
  writers queue on ``busy_timeout`` instead of failing on a lock upgrade);
- a blob is durable (fsynced file, fsynced folder) before the row naming it commits, and
  ``gc`` deletes blobs only while holding the write lock, after checking no row names them,
  while ``add`` re-checks under that same lock that its blob is still there: so a committed
  row never names a missing blob;
- names, aliases and tags are restricted to ``[A-Za-z0-9][A-Za-z0-9_-]{0,63}`` and no file
  path is ever built from them; blob paths come from sha256 digests only;
- weights are safetensors and metadata JSON: nothing is ever unpickled.

A ``Store`` object holds one SQLite connection: use it from one thread (open one per
thread or process; they may all write at once).
"""
from __future__ import annotations

import json
import os
import re
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from ..errors import AdapterNameError, LoadError, PolyAdapterError
from . import blobs, schema

INDEX = "index.sqlite"
STORE_PREFIX = "store:"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
BUSY_TIMEOUT_S = 60.0
LINEAGE_KEYS = ("adapters", "source", "sources", "modules_from")  # provenance keys naming source adapters
MAX_TREE_DEPTH = 32


# ============================================================================ errors
class StoreError(PolyAdapterError):
    """Something about the adapter store is wrong; the message names the store and what."""


class StoreNotFoundError(StoreError):
    """No store at that folder (run ``polyadapter store init``)."""


class NotFoundError(StoreError, LookupError):
    """An adapter name, version or alias is not in the store."""


class InvalidNameError(StoreError, AdapterNameError):
    """A name, alias, tag or reference is not in the safe alphabet."""


class InUseError(StoreError):
    """A version cannot be removed: other stored versions derive from it."""


class IntegrityError(StoreError, LoadError):
    """A blob is missing or corrupt (its sha256 does not match); nothing was loaded from it."""


class SchemaError(StoreError):
    """The store was written by a newer polyadapter (a newer schema)."""


# ============================================================================ refs and paths
@dataclass(frozen=True)
class Ref:
    """``NAME`` (the newest version), ``NAME@3`` (version 3) or ``NAME@prod`` (an alias)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


def is_store_ref(text) -> bool:
    """True for strings like ``store:NAME``, ``store:NAME@3``: what load/save hooks route here."""
    return isinstance(text, str) and text.startswith(STORE_PREFIX)


def parse_ref(text: str) -> Ref:
    """Parse ``[store:]NAME[@VERSION|@ALIAS]``; InvalidNameError names what is wrong."""
    if not isinstance(text, str):
        raise InvalidNameError(f"store reference must be a string, got {type(text).__name__}")
    body = text.removeprefix(STORE_PREFIX)
    name, sep, selector = body.partition("@")
    check_name(name, "adapter name", text)
    if not sep:
        return Ref(name)
    if selector.isascii() and selector.isdigit():
        if int(selector) < 1:
            raise InvalidNameError(f"store reference {text!r}: versions count from 1")
        return Ref(name, version=int(selector))
    check_alias(selector, text)
    return Ref(name, alias=selector)


def check_name(value, what: str = "name", where: str | None = None) -> str:
    """``value`` if it is a safe store name (also a valid adapter name), else InvalidNameError."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        shown = repr(value)[:80]
        ctx = f" in {where!r}" if where is not None and where != value else ""
        raise InvalidNameError(f"{what} {shown}{ctx} is not valid: use 1-64 ASCII letters, digits, '_' or '-', "
                               f"starting with a letter or digit")
    if what == "adapter name":  # a store name is loaded under that name by default
        from ..names import RESERVED
        if value in RESERVED:
            raise InvalidNameError(f"adapter name {value!r} is reserved (an attribute of torch's ModuleDict, "
                                   f"which holds adapters); choose another")
    return value


def check_alias(value, where: str | None = None) -> str:
    check_name(value, "alias", where)
    if value.isdigit():
        raise InvalidNameError(f"alias {value!r} is all digits, which would read as a version number")
    return value


def default_store_path() -> Path:
    """``$POLYADAPTER_HOME/store``, else ``$XDG_CACHE_HOME/polyadapter/store``, else
    ``~/.cache/polyadapter/store``."""
    home = os.environ.get("POLYADAPTER_HOME")
    if home:
        return Path(home).expanduser() / "store"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache).expanduser() / "polyadapter" / "store"


# ============================================================================ rows
_COLS = ("v.id, a.name, v.version, v.blob, v.size, v.created, v.description, v.method, v.structure_sha256, "
         "(SELECT group_concat(tag, ' ') FROM tags t WHERE t.version_id = v.id), "
         "(SELECT group_concat(alias, ' ') FROM aliases al WHERE al.version_id = v.id), v.meta, v.shapes")
_LIGHT = "v.id, a.name, v.version, v.blob, v.size, v.created, v.description, v.method, v.structure_sha256, v.tag_list"
_FROM = "FROM versions v JOIN adapters a ON a.id = v.adapter_id"


@dataclass(slots=True)  # slots: a list of 10,000 versions builds measurably faster
class Version:
    """One stored version of an adapter. ``meta`` is its ``polyadapter.json`` content,
    ``shapes`` its tensor shapes (both fetched and parsed on first use: listing 10,000
    versions does neither)."""

    id: int
    name: str
    version: int
    blob: str
    size: int
    created: float
    description: str
    method: str
    structure_sha256: str
    tags: list[str]
    aliases: list[str]
    meta_json: str | None = field(default=None, repr=False)   # None: fetched on first use (lists)
    shapes_json: str | None = field(default=None, repr=False)
    _fetch: object = field(default=None, repr=False, compare=False)
    _meta: dict | None = field(default=None, repr=False, compare=False)
    _shapes: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_row(cls, row) -> Version:
        return cls(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                   sorted(row[9].split()) if row[9] else [], sorted(row[10].split()) if row[10] else [],
                   row[11], row[12])

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def _texts(self) -> None:
        if self.meta_json is None:
            self.meta_json, self.shapes_json = self._fetch(self.id)

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._texts()
            self._meta = json.loads(self.meta_json)
        return self._meta

    @property
    def shapes(self) -> dict[str, list[int]]:
        if self._shapes is None:
            self._texts()
            self._shapes = json.loads(self.shapes_json)
        return self._shapes

    @property
    def config(self) -> dict:
        return self.meta.get("config") or {}

    @property
    def sites(self) -> list[str]:
        return list(self.meta.get("sites") or [])

    @property
    def base_model(self) -> dict:
        return self.meta.get("base_model") or {}

    @property
    def provenance(self) -> dict:
        return self.meta.get("provenance") or {}

    def summary(self) -> dict:
        """A JSON-ready description (what ``list --json`` prints per version)."""
        return {"ref": self.ref, "id": self.id, "name": self.name, "version": self.version, "method": self.method,
                "tags": self.tags, "aliases": self.aliases, "description": self.description,
                "size_bytes": self.size, "sha256": self.blob, "created": self.created,
                "structure_sha256": self.structure_sha256 or None}


@dataclass
class GcReport:
    blobs_removed: int = 0
    bytes_freed: int = 0
    temp_files_removed: int = 0


@dataclass
class VerifyReport:
    versions: int = 0
    blobs: int = 0
    problems: list[str] = field(default_factory=list)
    unreferenced_blobs: int = 0      # harmless: gc removes them
    stale_temp_files: int = 0        # harmless: gc removes them

    @property
    def ok(self) -> bool:
        return not self.problems


# ============================================================================ the store
class Store:
    """An adapter store at ``path`` (default: :func:`default_store_path`). Opening a
    folder that holds no store raises StoreNotFoundError; create one with
    :meth:`Store.init` (``polyadapter store init``)."""

    def __init__(self, path: str | Path | None = None, *, _create: bool = False):
        self.path = Path(path if path is not None else default_store_path()).expanduser().resolve()
        index = self.path / INDEX
        if not _create and not index.is_file():
            raise StoreNotFoundError(f"no adapter store at {self.path} (no {INDEX}); create one with "
                                     f"`polyadapter store init {self.path}` or Store.init({str(self.path)!r})")
        if _create:
            (self.path / blobs.BLOBS).mkdir(parents=True, exist_ok=True)
        (self.path / blobs.TMP).mkdir(exist_ok=True)
        self._pid = os.getpid()
        try:
            # isolation_level=None: we open every transaction ourselves (BEGIN IMMEDIATE for writes)
            self._conn = sqlite3.connect(str(index), timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")  # a returned add survives power loss too
            self._conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{index}: cannot open the store's index ({e})") from None
        self._open_schema(_create)

    @classmethod
    def init(cls, path: str | Path | None = None) -> Store:
        """Create a store at ``path`` (the folder may exist; an existing store is opened as is)."""
        return cls(path, _create=True)

    # ---------------------------------------------------------------- plumbing
    def _open_schema(self, create: bool) -> None:
        try:
            found = schema.read_version(self._conn)
            if found == schema.SCHEMA_VERSION:
                return self._read_id()
            if found is not None and found > schema.SCHEMA_VERSION:
                raise schema.NewerSchemaError(found)
            if found is None and not create:
                raise StoreNotFoundError(f"{self.path / INDEX} holds no adapter store (was `store init` "
                                         f"interrupted?); run `polyadapter store init {self.path}`")
            with self._write():  # re-read under the lock: another process may have migrated it
                found = schema.read_version(self._conn)
                if found is None:
                    schema.create(self._conn, uuid.uuid4().hex, self._derive)
                elif found < schema.SCHEMA_VERSION:
                    schema.migrate(self._conn, found, self._derive)
                elif found > schema.SCHEMA_VERSION:
                    raise schema.NewerSchemaError(found)
        except schema.NewerSchemaError as e:
            self._conn.close()
            from .._version import __version__
            raise SchemaError(f"the adapter store at {self.path} has schema version {e.found}, newer than this "
                              f"polyadapter ({__version__}) reads (up to {schema.SCHEMA_VERSION}); upgrade "
                              f"polyadapter to use it") from None
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise StoreError(f"{self.path / INDEX}: not a readable adapter store index ({e})") from None
        self._read_id()

    def _check_process(self) -> None:
        # SQLite connections must not cross fork(): using one from a child corrupts locks.
        if os.getpid() != self._pid:
            raise StoreError(f"this Store ({self.path}) was opened in another process (before a fork); "
                             f"open a new Store in this process")

    def _read_id(self) -> None:
        row = self._conn.execute("SELECT value FROM schema_info WHERE key='store_id'").fetchone()
        self.id = row[0] if row else ""

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @contextmanager
    def _write(self):
        """One write transaction: the write lock is taken first (BEGIN IMMEDIATE)."""
        self._check_process()
        try:
            self._conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise StoreError(f"store {self.path} is busy: could not take its write lock within "
                             f"{BUSY_TIMEOUT_S:.0f} s ({e})") from None
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException as e:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(e, sqlite3.Error):  # disk full, I/O error...: one clear line, nothing changed
                raise StoreError(f"store {self.path}: the index refused the change ({type(e).__name__}: {e}); "
                                 f"nothing was changed") from None
            raise

    @contextmanager
    def _read(self):
        """A read transaction: every query inside sees the same snapshot."""
        self._check_process()
        try:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(f"store {self.path}: cannot read the index ({type(e).__name__}: {e})") from None

    def _derive(self, sha: str, meta: dict) -> tuple[str, str, dict, int]:
        """(method, structure hash, tensor shapes, size) of a stored version (the migration
        to schema 2 computes them for old rows from the blob)."""
        try:
            data = blobs.read_blob(self.path, sha)
            return _derived(meta, _unpacked_shapes(meta, data), len(data))
        except Exception:  # noqa: BLE001 (a missing or corrupt blob must not block opening; verify names it)
            return _derived(meta, {}, 0)

    # ---------------------------------------------------------------- resolving
    def resolve(self, ref: str | Ref) -> Version:
        """The version ``ref`` names (``NAME``: the newest); NotFoundError names what exists."""
        with self._read() as c:
            return self._resolve(c, ref)

    def _resolve(self, c, ref: str | Ref) -> Version:
        r = ref if isinstance(ref, Ref) else parse_ref(ref)
        if r.version is not None:
            row = c.execute(f"SELECT {_COLS} {_FROM} WHERE a.name=? AND v.version=?", (r.name, r.version)).fetchone()
        elif r.alias is not None:
            row = c.execute(f"SELECT {_COLS} {_FROM} JOIN aliases x ON x.version_id = v.id "
                            f"WHERE a.name=? AND x.alias=?", (r.name, r.alias)).fetchone()
        else:
            row = c.execute(f"SELECT {_COLS} {_FROM} WHERE a.name=? ORDER BY v.version DESC LIMIT 1",
                            (r.name,)).fetchone()
        if row is None:
            raise NotFoundError(self._not_found(c, r))
        return Version.from_row(row)

    def _not_found(self, c, r: Ref) -> str:
        versions = [n for (n,) in c.execute("SELECT v.version FROM versions v JOIN adapters a ON a.id=v.adapter_id "
                                            "WHERE a.name=? ORDER BY v.version", (r.name,))]
        if not versions:
            return f"no adapter {r.name!r} in the store at {self.path}"
        aliases = [n for (n,) in c.execute("SELECT x.alias FROM aliases x JOIN adapters a ON a.id=x.adapter_id "
                                           "WHERE a.name=? ORDER BY x.alias", (r.name,))]
        what = f"version {r.version}" if r.version is not None else f"alias {r.alias!r}"
        return (f"adapter {r.name!r} has no {what} in the store at {self.path} (versions: "
                f"{', '.join(map(str, versions))}; aliases: {', '.join(aliases) or 'none'})")

    def versions(self, name: str) -> list[Version]:
        check_name(name, "adapter name")
        with self._read() as c:
            rows = c.execute(f"SELECT {_COLS} {_FROM} WHERE a.name=? ORDER BY v.version", (name,)).fetchall()
        return [Version.from_row(r) for r in rows]

    def blob_users(self, sha: str) -> list[str]:
        """Refs of every version whose weights are blob ``sha``."""
        with self._read() as c:
            return [f"{n}@{v}" for n, v in c.execute("SELECT a.name, v.version FROM versions v JOIN adapters a "
                                                     "ON a.id = v.adapter_id WHERE v.blob=? ORDER BY a.name, "
                                                     "v.version", (sha,))]

    # ---------------------------------------------------------------- adding
    def add(self, src: str | Path, name: str, *, tags=(), description: str = "", alias: str | None = None,
            parents=()) -> Version:
        """Add the adapter folder ``src`` (native or PEFT format) as a new version of ``name``.
        ``parents``: refs of stored versions it derives from (lineage a folder cannot carry)."""
        from ..formats import detect_format, native
        from ..formats.files import read_safetensors
        src = Path(src)
        parents = [(p, "parent") for p in parents]
        if detect_format(src) == "peft":
            meta, tensors = _read_peft(src)
            return self.add_parts(meta, tensors, name, tags=tags, description=description, alias=alias,
                                  parents=parents)
        meta = native.read_meta(src)
        file = native.weights_file(src, meta)
        if meta.get("packing") is None and file.is_file():
            data = file.read_bytes()
            if blobs.is_canonical(data):  # what polyadapter writes: store the bytes as they are
                return self._add_blob(meta, data, blobs.header_shapes(data), name, tags=tags,
                                      description=description, alias=alias, parents=parents)
        return self.add_parts(meta, read_safetensors(file), name, tags=tags, description=description, alias=alias,
                              parents=parents)

    def add_from_model(self, pm, adapter_name: str, name: str | None = None, *, tags=(), description: str = "",
                       alias: str | None = None) -> Version:
        """Add adapter ``adapter_name`` of the AdapterModel ``pm`` (what
        ``pm.save_adapter(adapter_name, "store:NAME")`` does). Lineage: every source its
        provenance names (keys adapters / source / sources / modules_from) that was
        itself loaded from this store becomes an edge to that stored version."""
        from ..formats import native
        name = adapter_name if name is None else name
        record = pm.record(adapter_name)
        packing, tensors = native.weights_for(pm, adapter_name)
        meta = native_meta(name=name, config=record.config.to_dict(), sites=record.sites,
                           saved_modules=record.saved_modules, base_model=pm.state.base_fingerprint,
                           provenance=record.provenance, packing=packing,
                           num_parameters=sum(t.numel() for t in pm.adapter_parameters(adapter_name).values()))
        return self.add_parts(meta, tensors, name, tags=tags, description=description, alias=alias,
                              parents=self._model_lineage(pm, adapter_name))

    def add_parts(self, meta: dict, tensors: dict, name: str, *, tags=(), description: str = "",
                  alias: str | None = None, parents=()) -> Version:
        """The lowest level: add a version from a ``polyadapter.json`` dict and the tensors of
        its weights file (packed, when ``meta`` says ``packing``). ``parents``: (ref or
        version id, role) pairs for lineage; a ref that does not resolve is an error, an id
        no longer stored is skipped (its source was removed since it was loaded)."""
        check_name(name, "adapter name")
        data = blobs.tensors_to_bytes(tensors)
        shapes = _unpacked_shapes(meta, data, tensors) if isinstance(meta, dict) else {}
        return self._add_blob(meta, data, shapes, name, tags=tags, description=description, alias=alias,
                              parents=parents)

    def _add_blob(self, meta: dict, data: bytes, shapes: dict, name: str, *, tags=(), description: str = "",
                  alias: str | None = None, parents=()) -> Version:
        """Commit a version whose weights file is ``data`` (canonical safetensors bytes)."""
        check_name(name, "adapter name")
        tags = sorted({check_name(t, "tag") for t in tags})
        if alias is not None:
            check_alias(alias)
        if not isinstance(description, str) or "\x00" in description:
            raise StoreError("description must be text without NUL characters")
        meta = _clean_meta(meta, name)
        method, structure, shapes, size = _derived(meta, shapes, len(data))
        sha, _ = blobs.write_blob(self.path, data)  # durable before any row names it
        now = time.time()
        with self._write() as c:
            # gc may have removed an identical, then unreferenced blob since we looked:
            # check again under the lock that gc also holds while deleting.
            if not blobs.blob_path(self.path, sha).is_file():
                blobs.write_blob(self.path, data, sha)
            c.execute("INSERT OR IGNORE INTO blobs(sha256, size, created) VALUES (?, ?, ?)", (sha, size, now))
            c.execute("INSERT OR IGNORE INTO adapters(name, next_version, created) VALUES (?, 1, ?)", (name, now))
            adapter_id, number = c.execute("SELECT id, next_version FROM adapters WHERE name=?", (name,)).fetchone()
            c.execute("UPDATE adapters SET next_version=? WHERE id=?", (number + 1, adapter_id))
            cur = c.execute("INSERT INTO versions(adapter_id, version, blob, meta, description, created, method, "
                            "structure_sha256, shapes, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (adapter_id, number, sha, json.dumps(meta), description, now, method, structure,
                             json.dumps(shapes), size))
            vid = cur.lastrowid
            c.executemany("INSERT INTO tags(version_id, tag) VALUES (?, ?)", [(vid, t) for t in tags])
            if alias is not None:
                c.execute("INSERT OR REPLACE INTO aliases(adapter_id, alias, version_id) VALUES (?, ?, ?)",
                          (adapter_id, alias, vid))
            for parent, role in parents:
                if isinstance(parent, int):
                    if not c.execute("SELECT 1 FROM versions WHERE id=?", (parent,)).fetchone():
                        continue
                    pid = parent
                else:
                    pid = self._resolve(c, parent).id
                c.execute("INSERT OR IGNORE INTO lineage(child_id, parent_id, role) VALUES (?, ?, ?)",
                          (vid, pid, role))
            schema.index_version(c, vid, name, method, tags, description, meta.get("provenance") or {})
            row = c.execute(f"SELECT {_COLS} {_FROM} WHERE v.id=?", (vid,)).fetchone()
        return Version.from_row(row)

    def _model_lineage(self, pm, adapter_name: str) -> list[tuple[int, str]]:
        """(stored version id, role) for the sources of a model's adapter that came from this store."""
        out = []
        record = pm.record(adapter_name)

        def origin(n):
            rec = pm.state.adapters.get(n) if isinstance(n, str) else None
            s = (rec.provenance or {}).get("store") if rec is not None else None
            if isinstance(s, dict) and isinstance(s.get("id"), int) and s.get("store") in (None, self.id):
                return s["id"]
            return None

        own = origin(adapter_name)
        if own is not None:  # re-saving an adapter loaded from the store (maybe trained further)
            out.append((own, "copy"))
        for key in LINEAGE_KEYS:
            value = record.provenance.get(key)
            names = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple, dict)) else []
            for n in names:
                vid = origin(n) if n != adapter_name else None
                if vid is not None:
                    out.append((vid, "modules_from" if key == "modules_from" else "source"))
        return out

    # ---------------------------------------------------------------- names, aliases, tags
    def set_alias(self, ref: str | Ref, alias: str) -> Version:
        """Point ``NAME@alias`` at the version ``ref`` names (moving it if it exists)."""
        check_alias(alias)
        with self._write() as c:
            v = self._resolve(c, ref)
            c.execute("INSERT OR REPLACE INTO aliases(adapter_id, alias, version_id) "
                      "SELECT adapter_id, ?, id FROM versions WHERE id=?", (alias, v.id))
        return self.resolve(f"{v.name}@{v.version}")

    def remove_alias(self, name: str, alias: str) -> None:
        check_name(name, "adapter name")
        check_alias(alias)
        with self._write() as c:
            cur = c.execute("DELETE FROM aliases WHERE alias=? AND adapter_id=(SELECT id FROM adapters WHERE name=?)",
                            (alias, name))
            if cur.rowcount == 0:
                raise NotFoundError(f"adapter {name!r} has no alias {alias!r} in the store at {self.path}")

    def tag(self, ref: str | Ref, tags, remove: bool = False) -> Version:
        """Add (or with ``remove``, drop) tags on one version."""
        tags = sorted({check_name(t, "tag") for t in tags})
        with self._write() as c:
            v = self._resolve(c, ref)
            if remove:
                c.executemany("DELETE FROM tags WHERE version_id=? AND tag=?", [(v.id, t) for t in tags])
            else:
                c.executemany("INSERT OR IGNORE INTO tags(version_id, tag) VALUES (?, ?)", [(v.id, t) for t in tags])
            v = self._resolve(c, Ref(v.name, v.version))
            schema.index_version(c, v.id, v.name, v.method, v.tags, v.description, v.provenance)
        return v

    # ---------------------------------------------------------------- reading
    def list(self, method: str | None = None, tag: str | None = None, compatible_with=None,
             name: str | None = None) -> list[Version]:
        """Every version (by name, then number), optionally only one method, tag, name, or
        those that fit a model (see :meth:`fits`): an AdapterModel, a bare nn.Module, or a
        packaged model name / local Hugging Face folder (loaded once)."""
        where, params = [], []
        if method is not None:
            where.append("v.method = ?")
            params.append(method)
        if tag is not None:
            where.append("EXISTS (SELECT 1 FROM tags t WHERE t.version_id = v.id AND t.tag = ?)")
            params.append(check_name(tag, "tag"))
        if name is not None:
            where.append("a.name = ?")
            params.append(check_name(name, "adapter name"))
        sql = f"SELECT {_LIGHT} {_FROM}" + (" WHERE " + " AND ".join(where) if where else "") + \
            " ORDER BY a.name, v.version"
        with self._read() as c:
            out = self._light(c, c.execute(sql, params).fetchall())
        if compatible_with is not None:
            target = model_shapes(compatible_with)
            out = [v for v in out if fits(v, target)]
        return out

    def search(self, text: str, limit: int = 100) -> list[Version]:
        """Versions whose name, method, tags, description or provenance (data set, metrics,
        settings) hold every word of ``text`` (as word prefixes), best match first (FTS5 bm25)."""
        words = re.findall(r"\w+", text or "")
        if not words:
            raise StoreError(f"search text {text!r} holds no words to search for")
        query = " ".join('"' + w.replace('"', '""') + '"*' for w in words[:32])
        with self._read() as c:
            rows = c.execute(f"SELECT {_LIGHT} FROM versions_fts f JOIN versions v ON v.id = f.rowid "
                             f"JOIN adapters a ON a.id = v.adapter_id WHERE versions_fts MATCH ? "
                             f"ORDER BY f.rank LIMIT ?", (query, int(limit))).fetchall()
            return self._light(c, rows)

    def _light(self, c, rows) -> list[Version]:
        """Versions from ``_LIGHT`` rows: tags from the row's ``tag_list``, aliases in one
        query for all rows (not one per row), metadata left to be fetched on first use.
        Listing 10,000 versions is then two SQL statements and no JSON parsing."""
        if not rows:
            return []
        aliases: dict = {}
        if c.execute("SELECT 1 FROM aliases LIMIT 1").fetchone() is not None:
            if len(rows) <= 500:
                sql = f"SELECT version_id, group_concat(alias, ' ') FROM aliases WHERE version_id IN " \
                      f"({','.join('?' * len(rows))}) GROUP BY version_id"
                aliases = dict(c.execute(sql, [r[0] for r in rows]))
            else:
                aliases = dict(c.execute("SELECT version_id, group_concat(alias, ' ') FROM aliases GROUP BY version_id"))
        fetch = self._fetch_texts
        return [Version(*r[:9], r[9].split() if r[9] else [], sorted(aliases[r[0]].split()) if r[0] in aliases else [],
                        None, None, fetch) for r in rows]

    def _fetch_texts(self, vid: int) -> tuple[str, str]:
        row = self._conn.execute("SELECT meta, shapes FROM versions WHERE id=?", (vid,)).fetchone()
        if row is None:
            raise NotFoundError(f"version id {vid} is no longer in the store at {self.path} (removed meanwhile)")
        return row

    def lineage(self, ref: str | Ref) -> dict:
        """``{"ref", "role", "parents": [...same, recursively]}`` for a version, plus
        ``"children"``: refs of versions that derive directly from it."""
        with self._read() as c:
            v = self._resolve(c, ref)

            def parents(vid, seen, depth):
                out = []
                for pid, role, pname, pver in c.execute(
                        "SELECT l.parent_id, l.role, a.name, v.version FROM lineage l JOIN versions v ON "
                        "v.id = l.parent_id JOIN adapters a ON a.id = v.adapter_id WHERE l.child_id=? "
                        "ORDER BY a.name, v.version", (vid,)).fetchall():
                    node = {"ref": f"{pname}@{pver}", "role": role, "parents": []}
                    if pid not in seen and depth < MAX_TREE_DEPTH:
                        node["parents"] = parents(pid, seen | {pid}, depth + 1)
                    out.append(node)
                return out

            children = [f"{n}@{ver}" for n, ver in c.execute(
                "SELECT a.name, v.version FROM lineage l JOIN versions v ON v.id = l.child_id JOIN adapters a "
                "ON a.id = v.adapter_id WHERE l.parent_id=? ORDER BY a.name, v.version", (v.id,))]
            return {"ref": v.ref, "parents": parents(v.id, {v.id}, 0), "children": sorted(set(children))}

    def show(self, ref: str | Ref) -> dict:
        """Everything about one version, JSON-ready: what ``polyadapter store show`` prints."""
        v = self.resolve(ref)
        others = self.versions(v.name)
        prov = v.provenance
        return {
            **v.summary(), "config": v.config, "sites": v.sites, "modules_to_save": v.meta.get("modules_to_save", []),
            "num_parameters": v.meta.get("num_parameters"), "tensors": len(v.shapes),
            "packing": v.meta.get("packing"), "base_model": v.base_model, "provenance": prov,
            "metrics": prov.get("metrics", {}), "library_version": v.meta.get("library_version"),
            "versions": [{"ref": o.ref, "created": o.created, "aliases": o.aliases, "tags": o.tags,
                          "sha256": o.blob} for o in others],
            "lineage": self.lineage(Ref(v.name, v.version)),
        }

    def read(self, ref: str | Ref) -> tuple[Version, dict, dict]:
        """(version, its polyadapter.json dict, its tensors unpacked), the weights checked
        against their sha256 first; IntegrityError names the adapter otherwise."""
        v = self.resolve(ref)
        tensors = self._stored_tensors(v)
        meta = v.meta
        if meta.get("packing") is not None:
            from ..formats import compeft
            if meta["packing"] != compeft.PACKING:
                raise LoadError(f"store {self.path}: adapter {v.ref}: unknown packing {meta['packing']!r}")
            tensors = compeft.unpack(tensors, f"store {v.ref}")
        return v, meta, tensors

    def _stored_tensors(self, v: Version) -> dict:
        """The tensors of ``v``'s blob as stored (packed ones stay packed), hash-checked."""
        try:
            data = blobs.read_blob(self.path, v.blob)
        except blobs.BlobError as e:
            raise IntegrityError(f"store {self.path}: adapter {v.ref}: {e}; nothing was loaded "
                                 f"(run `polyadapter store verify`)") from None
        try:
            return blobs.bytes_to_tensors(data)
        except Exception as e:  # noqa: BLE001 (hashes right but unreadable: written so by a broken writer)
            raise IntegrityError(f"store {self.path}: adapter {v.ref}: its blob is not readable safetensors "
                                 f"({type(e).__name__}: {e})") from None

    def load_into(self, pm, ref: str | Ref, name: str | None = None, activate: bool = True):
        """Install version ``ref`` into the AdapterModel ``pm`` as adapter ``name`` (default:
        the store name) and return its AdapterRecord. The blob's hash is checked, then every
        check of a folder load runs (``native.load_from``): on any error ``pm`` is unchanged.
        The record's provenance gets ``"store": {"store", "id", "name", "version", "sha256"}``,
        which later saves to the store turn into lineage."""
        from ..formats import native
        v, meta, tensors = self.read(ref)
        where = f"store adapter {v.ref} ({self.path})"
        record = native.load_from(pm, meta, tensors, where=where, name=name or v.name)
        record.provenance["store"] = {"store": self.id, "id": v.id, "name": v.name, "version": v.version,
                                      "sha256": v.blob}
        if activate:
            pm.set_active(record.name)
        return record

    def export(self, ref: str | Ref, dst: str | Path, format: str = "native", overwrite: bool = False) -> Path:
        """Write version ``ref`` as an adapter folder (``native`` or ``peft``), atomically."""
        if format not in ("native", "peft"):
            raise StoreError(f"unknown export format {format!r}; choose native or peft")
        from ..formats import native
        from ..formats.files import write_folder
        v = self.resolve(ref)
        meta, stored = v.meta, self._stored_tensors(v)  # hash-checked, as stored (packed or not)
        weights = native.WEIGHTS_FILE if meta.get("packing") is None else _compeft_file()
        dst = Path(dst)
        if format == "native":
            return write_folder(dst, {native.CONFIG_FILE: meta, weights: stored}, overwrite=overwrite)
        import tempfile

        from ..formats.peft import native_to_peft_folder
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst}: already exists; pass --overwrite to replace it")
        with tempfile.TemporaryDirectory(prefix=".polyadapter-export-") as tmp:
            folder = write_folder(Path(tmp) / "native", {native.CONFIG_FILE: meta, weights: stored})
            return native_to_peft_folder(folder, dst, overwrite=overwrite)

    # ---------------------------------------------------------------- removing, gc, verify
    def remove(self, ref: str | Ref, all_versions: bool = False) -> list[str]:
        """Remove one version (``NAME@V``, ``NAME@alias``), or every version of ``NAME``
        (``all_versions``; also when it has just one). Refused while a version not being
        removed derives from one that is. Blobs stay until :meth:`gc`. Returns the refs removed."""
        r = ref if isinstance(ref, Ref) else parse_ref(ref)
        with self._write() as c:
            if r.version is None and r.alias is None:
                ids = [(i, n) for i, n in c.execute("SELECT v.id, v.version FROM versions v JOIN adapters a ON "
                                                    "a.id = v.adapter_id WHERE a.name=? ORDER BY v.version",
                                                    (r.name,))]
                if not ids:
                    raise NotFoundError(self._not_found(c, r))
                if len(ids) > 1 and not all_versions:
                    raise StoreError(f"adapter {r.name!r} has {len(ids)} versions "
                                     f"({', '.join(str(n) for _, n in ids)}); remove one ({r.name}@N) or "
                                     f"pass --all (all_versions=True) to remove them all")
            else:
                v = self._resolve(c, r)
                ids = [(v.id, v.version)]
            removing = {i for i, _ in ids}
            marks = ",".join("?" * len(removing))
            users = c.execute(f"SELECT DISTINCT a.name, v.version, p.version FROM lineage l "
                              f"JOIN versions v ON v.id = l.child_id JOIN adapters a ON a.id = v.adapter_id "
                              f"JOIN versions p ON p.id = l.parent_id "
                              f"WHERE l.parent_id IN ({marks}) AND l.child_id NOT IN ({marks}) "
                              f"ORDER BY a.name, v.version", [*removing, *removing]).fetchall()
            if users:
                listing = ", ".join(f"{n}@{ver} (from {r.name}@{pv})" for n, ver, pv in users[:10])
                raise InUseError(f"cannot remove {r}: stored version(s) derive from it: {listing}; "
                                 f"remove those first")
            for vid in removing:
                c.execute("DELETE FROM versions_fts WHERE rowid=?", (vid,))
                c.execute("DELETE FROM tags WHERE version_id=?", (vid,))
                c.execute("DELETE FROM aliases WHERE version_id=?", (vid,))
                c.execute("DELETE FROM lineage WHERE child_id=?", (vid,))
                c.execute("DELETE FROM versions WHERE id=?", (vid,))
        return [f"{r.name}@{n}" for _, n in ids]

    def gc(self) -> GcReport:
        """Delete blobs no version names, and temp files whose writer is gone. Holds the
        write lock throughout, so a concurrent add cannot commit a row for a blob being deleted."""
        report = GcReport()
        with self._write() as c:
            referenced = {sha for (sha,) in c.execute("SELECT DISTINCT blob FROM versions")}
            touched = set()
            for sha, path in blobs.blob_files(self.path).items():
                if sha in referenced:
                    continue
                try:
                    size = path.stat().st_size
                except FileNotFoundError:
                    continue
                if blobs.remove(path):
                    report.blobs_removed += 1
                    report.bytes_freed += size
                    touched.add(path.parent)
            c.execute("DELETE FROM blobs WHERE sha256 NOT IN (SELECT blob FROM versions)")
            for tmp in blobs.stale_temp_files(self.path):
                if blobs.remove(tmp):
                    report.temp_files_removed += 1
            for folder in touched:
                blobs.fsync_dir(folder)
        return report

    def verify(self) -> VerifyReport:
        """Recompute every blob's sha256 and check the index; the report names what is
        missing or corrupt, and which versions use it. Does not raise (the CLI does)."""
        report = VerifyReport()
        with self._read() as c:
            rows = c.execute("SELECT v.id, a.name, v.version, v.blob, v.size, v.meta FROM versions v "
                             "JOIN adapters a ON a.id = v.adapter_id ORDER BY a.name, v.version").fetchall()
            check = c.execute("PRAGMA quick_check").fetchall()
        if [r[0] for r in check] != ["ok"]:
            report.problems.append(f"index {self.path / INDEX}: " + "; ".join(r[0] for r in check[:5]))
        users: dict[str, list[str]] = {}
        for vid, name, number, sha, size, meta_json in rows:
            report.versions += 1
            users.setdefault(sha, []).append(f"{name}@{number}")
            try:
                json.loads(meta_json)
            except json.JSONDecodeError as e:
                report.problems.append(f"{name}@{number}: its stored metadata is not valid JSON ({e})")
        sizes = {sha: size for _, _, _, sha, size, _ in rows}
        for sha, refs in users.items():
            report.blobs += 1
            problem = blobs.check_blob(self.path, sha, sizes[sha])
            if problem:
                report.problems.append(f"{problem}; used by {', '.join(refs)}")
        report.unreferenced_blobs = len(set(blobs.blob_files(self.path)) - set(users))
        report.stale_temp_files = len(blobs.stale_temp_files(self.path))
        return report


# ============================================================================ helpers
def native_meta(*, name: str, config: dict, sites, saved_modules, base_model: dict, provenance: dict,
                num_parameters: int, packing: str | None = None) -> dict:
    """The ``polyadapter.json`` content of an adapter, as ``formats.native.write`` writes it."""
    from .._version import __version__
    from ..formats import native
    meta = {
        "format": native.FORMAT,
        "format_version": native.PLAIN_VERSION if packing is None else native.FORMAT_VERSION,
        "library_version": __version__, "name": name, "config": config, "sites": list(sites),
        "modules_to_save": list(saved_modules), "num_parameters": int(num_parameters),
        "base_model": dict(base_model or {}), "provenance": dict(provenance or {}),
    }
    if packing is not None:
        meta["packing"] = packing
    return meta


def _clean_meta(meta: dict, name: str) -> dict:
    """A checked copy of ``meta`` as stored: plain JSON (non-finite floats as text, as the
    native writer does), every field checked as a folder load checks it, its name the
    store name, and no ``provenance.store`` (that names where a model's copy came from;
    lineage records it)."""
    from ..formats import native
    from ..validate import finite_or_text
    if not isinstance(meta, dict):
        raise StoreError(f"adding {name!r}: the adapter's metadata must be a dict, got {type(meta).__name__}")
    try:
        meta = json.loads(json.dumps(finite_or_text(meta), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise StoreError(f"adding {name!r}: metadata is not plain JSON ({e})") from None
    meta["name"] = name
    prov = meta.get("provenance")
    if isinstance(prov, dict):
        prov.pop("store", None)
    native.check_meta(meta, f"adding {name!r} to the store")  # refuse what could never load
    return meta


def _derived(meta: dict, shapes: dict, size: int) -> tuple[str, str, dict, int]:
    return (str((meta.get("config") or {}).get("method", "")),
            str((meta.get("base_model") or {}).get("structure_sha256") or ""), shapes, size)


def _unpacked_shapes(meta: dict, data: bytes, tensors: dict | None = None) -> dict[str, list[int]]:
    """Tensor shapes as loaded (a packed ComPEFT blob is unpacked to learn them)."""
    if meta.get("packing") is None:
        return blobs.header_shapes(data)
    from ..formats import compeft
    tensors = tensors if tensors is not None else blobs.bytes_to_tensors(data)
    return {k: list(t.shape) for k, t in compeft.unpack(tensors, "store").items()}


def _compeft_file() -> str:
    from ..formats import compeft
    return compeft.WEIGHTS_FILE


def _read_peft(src: Path) -> tuple[dict, dict]:
    """A PEFT folder as native meta + tensors, exactly as ``peft_to_native_folder`` converts it."""
    from ..formats import peft
    parts = peft.native_parts(src)
    meta = native_meta(name=src.name if NAME_RE.fullmatch(src.name) else "adapter", config=parts.config.to_dict(),
                       sites=parts.sites, saved_modules=parts.saved_modules, base_model={},
                       provenance=parts.provenance, num_parameters=sum(t.numel() for t in parts.tensors.values()))
    return meta, parts.tensors


# ---------------------------------------------------------------- compatibility
@dataclass
class ModelShapes:
    """What a compatibility check needs of a base model: its structure hash and, per
    module name, (input width, output width) for Linear-like and Embedding modules (None
    for the others)."""

    structure_sha256: str
    modules: dict[str, tuple[int, int] | None]


def model_shapes(model) -> ModelShapes:
    """From an AdapterModel, a bare nn.Module, or a packaged model name / local Hugging
    Face folder (loaded once with ``load_classifier``; adapters are not installed)."""
    from torch import nn

    from ..fingerprint import fingerprint
    from ..sites import LINEAR_TYPES, linear_dims, original_modules
    state = getattr(model, "state", None)  # an AdapterModel (told by its state: no import of model.py)
    if isinstance(model, nn.Module) and hasattr(state, "base_fingerprint"):
        base, fp = model.model, state.base_fingerprint
    elif isinstance(model, nn.Module):
        base, fp = model, None
    else:
        base, fp = _load_for_shapes(model), None
    if fp is None:
        fp = fingerprint(dict(base.named_parameters()), base)
    modules = {}
    for n, m in original_modules(base).items():
        if isinstance(m, LINEAR_TYPES):
            modules[n] = linear_dims(m)
        elif isinstance(m, nn.Embedding):
            modules[n] = (m.num_embeddings, m.embedding_dim)
        else:
            modules[n] = None
    return ModelShapes(fp.get("structure_sha256") or "", modules)


def _load_for_shapes(spec) -> object:
    """A packaged model name or local Hugging Face folder as a sequence classifier (its
    head as its config says; a fresh 2-label one for a base without a head), from local
    files only: the weights (for the fingerprint) and the module tree, no tokenizer."""
    from transformers import AutoModelForSequenceClassification

    from ..basemodels import model_folder, quiet_transformers
    folder = model_folder(spec)
    try:
        with quiet_transformers():
            return AutoModelForSequenceClassification.from_pretrained(
                folder, local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LoadError(f"{folder}: cannot load it to check compatibility: {first}") from None


def fits(v: Version, target: ModelShapes) -> bool:
    """Whether version ``v`` fits the model: the same base structure hash, or else every
    site and saved module exists in the model and every LoRA factor's outer dimension
    matches its module's (``lora_A``: (r, in), ``lora_B``: (out, r)). Saved modules'
    own shapes are not compared: a classifier head's width is the task's label count,
    which a model loaded for checking does not know. ``load_into`` checks everything."""
    from ..names import INPUT_SITE
    if v.structure_sha256 and v.structure_sha256 == target.structure_sha256:
        return True
    mods = target.modules
    if any(s != INPUT_SITE and s not in mods for s in v.sites):
        return False
    if any(s not in mods for s in v.meta.get("modules_to_save") or []):
        return False
    for key, shape in v.shapes.items():
        site, _, param = key.rpartition(".")
        dims = mods.get(site)
        if dims is None or len(shape) != 2:
            continue
        if param == "lora_A" and shape[1] != dims[0]:
            return False
        if param == "lora_B" and shape[0] != dims[1]:
            return False
    return True


# ---------------------------------------------------------------- hooks for store: refs elsewhere
def load_from_store(pm, ref: str, name: str | None = None, activate: bool = True, store: str | Path | None = None):
    """``pm.load_adapter("store:NAME[@V|@alias]")``: load from the store at ``store``
    (default: :func:`default_store_path`). Returns the AdapterRecord."""
    with Store(store) as s:
        return s.load_into(pm, ref, name=name, activate=activate)


def save_to_store(pm, adapter_name: str, ref: str, store: str | Path | None = None, *, tags=(),
                  description: str = "") -> Version:
    """``pm.save_adapter(name, "store:NAME[@alias]")``: add the adapter as the next version
    of NAME (and point the alias at it). A version number cannot be chosen: versions are
    numbered by the store."""
    r = parse_ref(ref)
    if r.version is not None:
        raise StoreError(f"cannot save to {ref!r}: the store numbers versions itself; save to "
                         f"'store:{r.name}' (or 'store:{r.name}@ALIAS' to also set an alias)")
    with Store(store) as s:
        return s.add_from_model(pm, adapter_name, r.name, tags=tags, description=description, alias=r.alias)
