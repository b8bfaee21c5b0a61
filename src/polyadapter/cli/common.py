"""Pieces every verb group shares: argument types, data/run options, run folders, tables."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import PolyAdapterError

ADAPTER_DIR = "adapter"      # inside a run folder (--out): the adapter itself
METRICS_FILE = "metrics.json"
MAX_SEED = 2**32 - 1   # numpy's and most samplers' seed range


class CLIError(PolyAdapterError):
    """A command-line argument does not make sense (bad --set, missing config file...)."""


# ---------------------------------------------------------------------- typed numbers
# argparse calls these on each value; an ArgumentTypeError becomes argparse's usage
# error (exit code 2, no traceback), naming the option and the value.
def count(low: int = 1, high: int = 10**6):
    """An integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer from {low:,} to {high:,}")
        return value
    parse.__name__ = "integer"
    return parse


def number(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """A finite number in the interval from ``low`` to ``high`` (open ends as told)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low) and \
            (value < high if high_open else value <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text!r}: expected a finite number in {interval}")
        return value
    parse.__name__ = "number"
    return parse


SEED = count(0, MAX_SEED)
SHARE = number(0, 1, low_open=True)               # a share of entries or energy kept: (0, 1]
WEIGHT = number(-1e6, 1e6)                         # a combination weight


def _size(text: str) -> int | float:
    """A count (``600``) or a fraction of the data (``0.2``)."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count or a fraction") from None
    if value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count >= 0 or a fraction in (0, 1)")
    return value


DATA_HELP = "'bbc' (BBC News, 5 topics), 'tweets' (sentiment, 3 classes), or a .csv/.tsv/.jsonl file"


def _add_data_args(p: argparse.ArgumentParser, required: bool = True, help: str = DATA_HELP) -> None:
    p.add_argument("--data", required=required, help=help)
    p.add_argument("--text-column", default="text", help="text column of a data file (default: text)")
    p.add_argument("--label-column", default="label", help="label column of a data file (default: label)")


def _add_run_args(p: argparse.ArgumentParser, defaults: dict, task_defaults: dict | None = None) -> None:
    """The training options. ``task_defaults`` (``{"causal-lm": {"lr": 1e-3, ...}}``): the
    options it names default to None, their help gives every task's default, and the verb
    fills them in (:func:`fill_defaults`)."""
    def default(key: str) -> dict:
        if not task_defaults or not any(key in d for d in task_defaults.values()):
            return {"default": defaults[key], "help": "default: %(default)s"}
        others = "".join(f"; {task}: {d[key]}" for task, d in task_defaults.items() if key in d)
        return {"default": None, "help": f"default: {defaults[key]}{others}"}

    g = p.add_argument_group("training")
    d = default("epochs")
    g.add_argument("--epochs", type=count(1, 10_000), **d)
    d = default("lr")
    g.add_argument("--lr", type=number(0, 10, low_open=True), default=d["default"],
                   help=f"AdamW learning rate ({d['help']})")
    g.add_argument("--batch-size", type=count(1, 65_536), default=defaults["batch_size"],
                   help="default: %(default)s")
    d = default("max_length")
    g.add_argument("--max-length", type=count(1, 1_000_000), default=d["default"],
                   help=f"tokens per text, longer texts are cut ({d['help']})")
    rest = "all that the test split leaves" if defaults["train_size"] is None else "%(default)s"
    g.add_argument("--train-size", type=_size, default=defaults["train_size"],
                   help=f"training examples, a count or a fraction (default: {rest})")
    g.add_argument("--test-size", type=_size, default=defaults["test_size"],
                   help="held-out test examples, a count or a fraction (default: %(default)s)")
    g.add_argument("--seed", type=SEED, default=0, help="split, head initialisation, shuffling (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def fill_defaults(args, defaults: dict) -> None:
    """Set each option of ``args`` that is None (not given) to its value in ``defaults``."""
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _parse_set(items: list[str]) -> dict:
    """``key=value`` pairs; values are JSON literals when they parse, else strings."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CLIError(f"--set {item!r}: expected key=value, e.g. --set r=16 or --set 'targets=[\"query\"]'")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _read_config(path: str | None) -> dict:
    """Config fields from a JSON file (``--config``)."""
    if path is None:
        return {}
    from ..formats.files import read_json
    return read_json(Path(path))


def adapter_folder(path: str | Path) -> Path:
    """An adapter folder, or a run folder (``--out`` of train/quickstart) holding one."""
    p = Path(path)
    if not _is_adapter_folder(p) and (p / ADAPTER_DIR).is_dir():
        return p / ADAPTER_DIR
    return p


# ---------------------------------------------------------------------- store references
def add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="DIR", default=None,
                   help="adapter store for store:NAME[@VERSION|@ALIAS] references (default: $POLYADAPTER_HOME/store, "
                        "else ~/.cache/polyadapter/store)")


def is_store_ref(text) -> bool:
    from ..store import is_store_ref as check
    return check(str(text))


def check_store_out(out: str, store_dir: str | None) -> None:
    """For ``--out store:NAME``: the name is valid, no version is asked for (the store
    numbers them) and the store exists — all before anything is trained or loaded."""
    from ..store import Store, parse_ref
    ref = parse_ref(out)
    if ref.version is not None:
        raise CLIError(f"--out {out}: the store numbers versions itself; use --out store:{ref.name} "
                       f"(or store:{ref.name}@ALIAS)")
    Store(store_dir).close()  # StoreNotFoundError (run `polyadapter store init`) before any work


def check_out(out, store_dir: str | None, overwrite: bool) -> tuple[bool, str | Path]:
    """``--out`` of a training verb, checked before any work: (to the store?, where the
    adapter goes: the store:NAME reference, or OUT/adapter inside the run folder OUT)."""
    if is_store_ref(out):
        check_store_out(str(out), store_dir)
        return True, str(out)
    from ..formats.folders import check_destination
    out = Path(out)
    target = out / ADAPTER_DIR
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out}: is a file; --out is a run folder (the adapter goes to OUT/{ADAPTER_DIR})")
    check_destination(target, overwrite)  # refuses a non-adapter folder, and unwritable places
    return False, target


def check_max_length(net, max_length: int) -> None:
    """CLIError when --max-length exceeds the positions the model has."""
    positions = getattr(getattr(net, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        raise CLIError(f"--max-length {max_length} is more than the model's {positions} positions")


def check_format(format: str, method: str) -> None:
    """CLIError when ``--format peft`` cannot hold a ``method`` adapter."""
    if format == "peft":
        from ..formats.peft import PEFT_TYPES
        if method not in PEFT_TYPES.values():
            raise CLIError(f"PEFT's format cannot hold a {method} adapter (only {sorted(PEFT_TYPES.values())}); "
                           f"use --format native")


def _is_adapter_folder(p: Path) -> bool:
    return (p / "polyadapter.json").is_file() or (p / "adapter_config.json").is_file()


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _write_json(path: Path, data: dict) -> None:
    from ..formats.files import dump_json
    from ..formats.folders import write_file
    write_file(path, dump_json(data).encode("utf-8"))
