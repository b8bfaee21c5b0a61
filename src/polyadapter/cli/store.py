"""The adapter store's verbs: ``polyadapter store init|add|list|show|search|export|rm|gc|verify|alias|tag``.

Every verb but ``init`` takes ``--store DIR`` (before or after the verb); without it the
default store is used ($POLYADAPTER_HOME/store, else ~/.cache/polyadapter/store).
"""
from __future__ import annotations

import argparse
import json
import time

from .common import adapter_folder, count, human_bytes


def _open(args):
    from ..store import Store
    return Store(getattr(args, "store", None))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _rows(versions) -> None:
    """A plain table: one line per version."""
    header = ("REF", "METHOD", "SIZE", "CREATED", "ALIASES", "TAGS", "DESCRIPTION")
    rows = [(v.ref, v.method, human_bytes(v.size), _when(v.created), ",".join(v.aliases) or "-",
             ",".join(v.tags) or "-", (v.description[:40] or "-")) for v in versions]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    for r in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


# ---------------------------------------------------------------------- verbs
def cmd_init(args) -> int:
    from ..store import Store
    with Store.init(args.dir if args.dir is not None else getattr(args, "store", None)) as s:
        print(f"adapter store ready at {s.path}")
    return 0


def cmd_add(args) -> int:
    with _open(args) as s:
        v = s.add(adapter_folder(args.src), name=args.name, tags=args.tag or (), description=args.description or "",
                  alias=args.alias, parents=args.parent or ())
        users = [r for r in s.blob_users(v.blob) if r != v.ref]
        shared = f" (same weights as {', '.join(users[:3])}: stored once)" if users else ""
        print(f"added {v.ref}: {v.method}, {human_bytes(v.size)}, sha256 {v.blob[:12]}{shared}")
    return 0


def cmd_list(args) -> int:
    with _open(args) as s:
        versions = s.list(method=args.method, tag=args.tag, compatible_with=args.compatible_with)
    if args.json:
        print(json.dumps([v.summary() for v in versions], indent=2))
    elif not versions:
        print("no adapters match" if (args.method or args.tag or args.compatible_with) else "the store is empty")
    else:
        _rows(versions)
    return 0


def cmd_search(args) -> int:
    with _open(args) as s:
        versions = s.search(" ".join(args.text), limit=args.limit)
    if args.json:
        print(json.dumps([v.summary() for v in versions], indent=2))
    elif not versions:
        print("no adapters match")
    else:
        _rows(versions)
    return 0


def tree_lines(node: dict, prefix: str = "") -> list[str]:
    """``node``'s parents drawn as a tree (``├──`` / ``└──``), one line per edge."""
    out = []
    parents = node.get("parents", [])
    for i, p in enumerate(parents):
        last = i == len(parents) - 1
        out.append(f"{prefix}{'└── ' if last else '├── '}{p['ref']} ({p['role']})")
        out.extend(tree_lines(p, prefix + ("    " if last else "│   ")))
    return out


def cmd_show(args) -> int:
    with _open(args) as s:
        d = s.show(args.ref)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    base = d["base_model"]
    base_text = (f"{base.get('class')} ({base.get('model_type')}), {base.get('num_parameters', 0):,} parameters, "
                 f"structure {base.get('structure_sha256')}, weights {base.get('weights_sha256')}"
                 if base else "unknown (added from a folder without a fingerprint)")
    config = ", ".join(f"{k}={json.dumps(v)}" for k, v in d["config"].items())
    rows = [("ref", d["ref"] + (f"  (aliases: {', '.join(d['aliases'])})" if d["aliases"] else "")),
            ("method", d["method"]), ("config", config), ("tags", ", ".join(d["tags"]) or "-"),
            ("description", d["description"] or "-"),
            ("sites", f"{len(d['sites'])}" + (f" (e.g. {d['sites'][0]})" if d["sites"] else "")),
            ("modules to save", ", ".join(d["modules_to_save"]) or "-"),
            ("parameters", f"{d['num_parameters']:,}" if d["num_parameters"] is not None else "?"),
            ("size", f"{human_bytes(d['size_bytes'])} in {d['tensors']} tensors" +
             (f", packed ({d['packing']})" if d["packing"] else "")),
            ("sha256", d["sha256"]), ("added", _when(d["created"])), ("base model", base_text)]
    for k, v in d["metrics"].items():
        rows.append((f"metrics.{k}", f"{v:.4f}" if isinstance(v, float) else str(v)))
    for k, v in d["provenance"].items():
        if k != "metrics":
            rows.append((f"provenance.{k}", json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
    print("versions")
    for o in d["versions"]:
        mark = "*" if o["ref"] == d["ref"] else " "
        extra = "".join(f"  @{a}" for a in o["aliases"])
        print(f"  {mark} {o['ref']}  {_when(o['created'])}  {o['sha256'][:12]}{extra}")
    print("lineage")
    print(f"  {d['ref']}")
    for line in tree_lines(d["lineage"]) or ["(no stored sources)"]:
        print(f"  {line}")
    if d["lineage"]["children"]:
        print(f"  derived from it: {', '.join(d['lineage']['children'])}")
    return 0


def cmd_export(args) -> int:
    with _open(args) as s:
        dst = s.export(args.ref, args.dst, format=args.format, overwrite=args.overwrite)
    print(f"exported {args.ref} -> {dst} ({args.format} format)")
    return 0


def cmd_rm(args) -> int:
    with _open(args) as s:
        removed = s.remove(args.ref, all_versions=args.all)
    print(f"removed {', '.join(removed)} (run `polyadapter store gc` to free unused weights)")
    return 0


def cmd_gc(args) -> int:
    with _open(args) as s:
        r = s.gc()
    print(f"removed {r.blobs_removed} unused blob(s) ({human_bytes(r.bytes_freed)}) and {r.temp_files_removed} "
          f"stale temp file(s)")
    return 0


def cmd_verify(args) -> int:
    from ..store import IntegrityError
    with _open(args) as s:
        r = s.verify()
        where = s.path
    for p in r.problems:
        print(f"problem: {p}")
    if r.problems:
        raise IntegrityError(f"store {where}: {len(r.problems)} problem(s) in {r.versions} version(s) / {r.blobs} "
                             f"blob(s); first: {r.problems[0]}")
    extra = ""
    if r.unreferenced_blobs or r.stale_temp_files:
        extra = f" ({r.unreferenced_blobs} unused blob(s), {r.stale_temp_files} stale temp file(s): run gc)"
    print(f"ok: {r.versions} version(s), {r.blobs} blob(s) verified{extra}")
    return 0


def cmd_alias(args) -> int:
    from ..store import parse_ref
    with _open(args) as s:
        if args.remove:
            s.remove_alias(parse_ref(args.ref).name, args.alias)
            print(f"removed alias {parse_ref(args.ref).name}@{args.alias}")
        else:
            v = s.set_alias(args.ref, args.alias)
            print(f"{v.name}@{args.alias} -> {v.ref}")
    return 0


def cmd_tag(args) -> int:
    with _open(args) as s:
        v = s.tag(args.ref, args.tags, remove=args.remove)
    print(f"{v.ref}: tags {', '.join(v.tags) or '-'}")
    return 0


# ---------------------------------------------------------------------- parser
def add_parsers(sub) -> None:
    """Add the ``store`` command and its verbs to the subparsers object ``sub``."""
    store = sub.add_parser("store", help="the local adapter store: versions, aliases, tags, search, lineage",
                           description="A local library of adapters: one SQLite index plus content-addressed "
                                       "safetensors blobs. Refs: NAME (newest), NAME@3, NAME@alias.")
    store.add_argument("--store", default=None, metavar="DIR",
                       help="the store folder (default: $POLYADAPTER_HOME/store, else ~/.cache/polyadapter/store)")
    verbs = store.add_subparsers(dest="store_command", metavar="VERB", required=True)

    def verb(name, func, help):
        p = verbs.add_parser(name, help=help, description=help)
        # SUPPRESS: given after the verb it wins, else the one before the verb (or the default) stays
        p.add_argument("--store", default=argparse.SUPPRESS, metavar="DIR", help="the store folder")
        p.set_defaults(func=func)
        return p

    p = verb("init", cmd_init, "create a store (default location unless DIR or --store is given)")
    p.add_argument("dir", nargs="?", default=None, metavar="DIR")

    p = verb("add", cmd_add, "add an adapter folder (native or PEFT, or a run folder) as a new version")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--name", required=True, help="store name; adding it again makes NAME@2, NAME@3, ...")
    p.add_argument("--tag", action="append", metavar="T", help="a tag (repeatable)")
    p.add_argument("--description", default="", metavar="TEXT")
    p.add_argument("--alias", default=None, metavar="A", help="point NAME@A at the new version")
    p.add_argument("--parent", action="append", metavar="REF", help="a stored version it derives from (repeatable)")

    p = verb("list", cmd_list, "list stored versions")
    p.add_argument("--method", default=None, metavar="M")
    p.add_argument("--tag", default=None, metavar="T")
    p.add_argument("--compatible-with", default=None, metavar="MODEL",
                   help="only versions that fit MODEL (a packaged model name like minilm, or a local HF folder)")
    p.add_argument("--json", action="store_true")

    p = verb("show", cmd_show, "everything about one version, its versions, aliases and lineage")
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("--json", action="store_true")

    p = verb("search", cmd_search, "full-text search over names, tags, descriptions and provenance")
    p.add_argument("text", nargs="+", metavar="TEXT")
    p.add_argument("--limit", type=count(1, 1_000_000), default=100, help="most results (default: %(default)s)")
    p.add_argument("--json", action="store_true")

    p = verb("export", cmd_export, "write a stored version as an adapter folder")
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--format", choices=("native", "peft"), default="native")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    p = verb("rm", cmd_rm, "remove a version (refused while another stored version derives from it)")
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("--all", action="store_true", help="remove every version of NAME")

    verb("gc", cmd_gc, "delete weights no version uses, and stale temp files")
    verb("verify", cmd_verify, "recompute every hash; exit code 2 if anything is missing or corrupt")

    p = verb("alias", cmd_alias, "point NAME@ALIAS at a version (or --remove it)")
    p.add_argument("ref", metavar="NAME@V")
    p.add_argument("alias", metavar="ALIAS")
    p.add_argument("--remove", action="store_true")

    p = verb("tag", cmd_tag, "add tags to a version (or --remove them)")
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("tags", nargs="+", metavar="TAG")
    p.add_argument("--remove", action="store_true")
