"""The store's SQLite index: its tables, its schema version and the migrations between versions.

Version 1 holds the facts: adapter names, their numbered versions (each naming one weights
blob by sha256 and keeping the adapter's ``polyadapter.json`` content), tags, aliases and
lineage edges. Version 2 adds what makes queries fast without reading blobs: each version's
method, base-structure hash and tensor shapes as columns, and an FTS5 index for search.

A store written by a newer polyadapter (a schema version above ``SCHEMA_VERSION``) is
refused; an older one is migrated in one write transaction when it is opened, so a crash
mid-migration leaves the old schema intact.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

SCHEMA_VERSION = 2

# Version 1: the facts. AUTOINCREMENT so a version id is never reused after a removal: a
# model's provenance ("store": {"id": ...}) keeps naming the version it came from.
V1_TABLES = """
CREATE TABLE IF NOT EXISTS schema_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS adapters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    next_version INTEGER NOT NULL DEFAULT 1,   -- numbers are never reused, even after rm
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS blobs (
    sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    adapter_id INTEGER NOT NULL REFERENCES adapters(id),
    version INTEGER NOT NULL,
    blob TEXT NOT NULL REFERENCES blobs(sha256),
    meta TEXT NOT NULL,                          -- the polyadapter.json content (JSON)
    description TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    UNIQUE (adapter_id, version)
);
CREATE TABLE IF NOT EXISTS tags (
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (version_id, tag)
);
CREATE TABLE IF NOT EXISTS aliases (
    adapter_id INTEGER NOT NULL REFERENCES adapters(id),
    alias TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    PRIMARY KEY (adapter_id, alias)
);
CREATE TABLE IF NOT EXISTS lineage (
    child_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    parent_id INTEGER NOT NULL REFERENCES versions(id),
    role TEXT NOT NULL,                          -- source | modules_from | copy | parent
    PRIMARY KEY (child_id, parent_id, role)
);
CREATE INDEX IF NOT EXISTS lineage_parent ON lineage(parent_id);
CREATE INDEX IF NOT EXISTS versions_blob ON versions(blob);
CREATE INDEX IF NOT EXISTS tags_tag ON tags(tag);
"""

# Version 2: derived columns and the search index (all recomputable from version 1's facts).
V2_CHANGES = """
ALTER TABLE versions ADD COLUMN method TEXT NOT NULL DEFAULT '';
ALTER TABLE versions ADD COLUMN structure_sha256 TEXT NOT NULL DEFAULT '';
ALTER TABLE versions ADD COLUMN shapes TEXT NOT NULL DEFAULT '{}';   -- tensor key -> shape (JSON)
ALTER TABLE versions ADD COLUMN size INTEGER NOT NULL DEFAULT 0;     -- weights bytes
ALTER TABLE versions ADD COLUMN tag_list TEXT NOT NULL DEFAULT '';  -- sorted tags, space-separated (for list)
CREATE INDEX IF NOT EXISTS versions_method ON versions(method);
CREATE INDEX IF NOT EXISTS aliases_version ON aliases(version_id);
CREATE INDEX IF NOT EXISTS versions_list ON versions(adapter_id, version, id, blob, size, created, description,
    method, structure_sha256, tag_list);
CREATE VIRTUAL TABLE IF NOT EXISTS versions_fts USING fts5(name, method, tags, description, provenance);
"""


class NewerSchemaError(Exception):
    """Raised with the version found; the store turns it into a user-facing error."""

    def __init__(self, found: int):
        super().__init__(found)
        self.found = found


def read_version(conn: sqlite3.Connection) -> int | None:
    """The schema version of an index, or None for an empty (new) file."""
    has = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_info'").fetchone()
    if not has:
        return None
    row = conn.execute("SELECT value FROM schema_info WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else None


def create_v1(conn: sqlite3.Connection, store_id: str) -> None:
    """Create a version-1 index (inside the caller's transaction). Kept so tests can build
    an old store and check that opening it migrates."""
    for statement in _statements(V1_TABLES):
        conn.execute(statement)
    conn.execute("INSERT OR REPLACE INTO schema_info VALUES ('schema_version', '1')")
    conn.execute("INSERT OR IGNORE INTO schema_info VALUES ('store_id', ?)", (store_id,))


def create(conn: sqlite3.Connection, store_id: str, derive: Callable) -> None:
    """Create the newest schema (inside the caller's transaction)."""
    create_v1(conn, store_id)
    migrate(conn, 1, derive)


def migrate(conn: sqlite3.Connection, found: int, derive: Callable) -> None:
    """Bring an index from version ``found`` to ``SCHEMA_VERSION`` (inside the caller's
    write transaction). ``derive(blob_sha, meta) -> (method, structure, shapes, size)``
    computes version 2's columns for an existing row (it reads the blob's header)."""
    if found > SCHEMA_VERSION:
        raise NewerSchemaError(found)
    if found < 2:
        _v1_to_v2(conn, derive)
    conn.execute("UPDATE schema_info SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))


def _v1_to_v2(conn: sqlite3.Connection, derive: Callable) -> None:
    for statement in _statements(V2_CHANGES):
        conn.execute(statement)
    rows = conn.execute("SELECT v.id, v.blob, v.meta, v.description, a.name FROM versions v "
                        "JOIN adapters a ON a.id = v.adapter_id").fetchall()
    for vid, blob, meta_json, description, name in rows:
        meta = json.loads(meta_json)
        method, structure, shapes, size = derive(blob, meta)
        conn.execute("UPDATE versions SET method=?, structure_sha256=?, shapes=?, size=? WHERE id=?",
                     (method, structure, json.dumps(shapes), size, vid))
        tags = [t for (t,) in conn.execute("SELECT tag FROM tags WHERE version_id=?", (vid,))]
        index_version(conn, vid, name, method, tags, description, meta.get("provenance") or {})


def index_version(conn: sqlite3.Connection, vid: int, name: str, method: str, tags: list[str],
                  description: str, provenance: dict) -> None:
    """(Re)write what is derived from version ``vid``'s tags and text: its search row and
    its ``tag_list`` (the tags table stays the truth; the copy spares ``list`` a query)."""
    conn.execute("UPDATE versions SET tag_list=? WHERE id=?", (" ".join(sorted(tags)), vid))
    conn.execute("DELETE FROM versions_fts WHERE rowid=?", (vid,))
    conn.execute("INSERT INTO versions_fts(rowid, name, method, tags, description, provenance) "
                 "VALUES (?, ?, ?, ?, ?, ?)",
                 (vid, name, method, " ".join(tags), description, provenance_text(provenance)))


def provenance_text(provenance: dict) -> str:
    """Provenance flattened to words for search: keys and values ("data bbc metrics
    test_accuracy 0.91 ..."), so a data set name or a metric's name finds the adapter."""
    out: list[str] = []

    def walk(value, depth=0):
        if depth > 6 or len(out) > 2000:  # bounded: provenance is small, but never trust input
            return
        if isinstance(value, dict):
            for k, v in value.items():
                out.append(str(k))
                walk(v, depth + 1)
        elif isinstance(value, (list, tuple)):
            for v in value[:200]:
                walk(v, depth + 1)
        elif value is not None:
            out.append(str(value))

    walk({k: v for k, v in provenance.items() if k != "store"})
    return " ".join(out)


def _statements(script: str) -> list[str]:
    """Split a script of simple statements (no ';' inside them) for conn.execute, which,
    unlike executescript, does not commit the caller's transaction."""
    lines = [ln.split("--")[0] for ln in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
