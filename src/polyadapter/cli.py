"""The ``polyadapter`` command line.

    polyadapter quickstart                       # LoRA on MiniLM, BBC News, in a few minutes
    polyadapter train --data bbc --method lora --out runs/bbc-lora
    polyadapter eval --adapter runs/bbc-lora --data bbc
    polyadapter info runs/bbc-lora
    polyadapter convert --to peft runs/bbc-lora/adapter peft-folder
    polyadapter methods

Every deliberate error (``PolyAdapterError``) ends the command with a one-line message
on stderr and exit code 2, without a traceback.
"""
from __future__ import annotations

# argparse, not click/typer: it ships with Python, so the CLI adds no dependency and
# sub-commands, help and usage errors (exit code 2) come for free.
import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

from . import __version__
from .errors import PolyAdapterError

ADAPTER_DIR = "adapter"      # inside a run folder (--out): the adapter itself
METRICS_FILE = "metrics.json"

QUICKSTART = {
    "model": "minilm", "data": "bbc",
    "config": {"method": "lora", "r": 8, "alpha": 16.0, "targets": ["query", "value"],
               "modules_to_save": ["classifier"]},
    "train_size": 600, "test_size": 300, "epochs": 1, "lr": 5e-3, "batch_size": 8, "max_length": 128,
}


class CLIError(PolyAdapterError):
    """A command-line argument does not make sense (bad --set, missing config file...)."""


# ============================================================================ shared pieces
def _size(text: str) -> int | float:
    """A count (``600``) or a fraction of the data (``0.2``)."""
    try:
        value = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count or a fraction") from None
    if value < 0 or (isinstance(value, float) and value >= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a count >= 0 or a fraction in (0, 1)")
    return value


def _add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="'bbc' (BBC News, 5 topics), 'tweets' (sentiment, 3 classes), or a .csv/.tsv/.jsonl file")
    p.add_argument("--text-column", default="text", help="text column of a data file (default: text)")
    p.add_argument("--label-column", default="label", help="label column of a data file (default: label)")


def _add_run_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=defaults["epochs"], help="default: %(default)s")
    g.add_argument("--lr", type=float, default=defaults["lr"], help="AdamW learning rate (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="default: %(default)s")
    g.add_argument("--max-length", type=int, default=defaults["max_length"],
                   help="tokens per text, longer texts are cut (default: %(default)s)")
    rest = "all that the test split leaves" if defaults["train_size"] is None else "%(default)s"
    g.add_argument("--train-size", type=_size, default=defaults["train_size"],
                   help=f"training examples, a count or a fraction (default: {rest})")
    g.add_argument("--test-size", type=_size, default=defaults["test_size"],
                   help="held-out test examples, a count or a fraction (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="split, head initialisation, shuffling (default: 0)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


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
    from .formats.files import read_json
    return read_json(Path(path))


def adapter_folder(path: str | Path) -> Path:
    """An adapter folder, or a run folder (``--out`` of train/quickstart) holding one."""
    p = Path(path)
    if not _is_adapter_folder(p) and (p / ADAPTER_DIR).is_dir():
        return p / ADAPTER_DIR
    return p


def _is_adapter_folder(p: Path) -> bool:
    return (p / "polyadapter.json").is_file() or (p / "adapter_config.json").is_file()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# ============================================================================ training (train, quickstart)
def run_training(*, model: str, data_spec: str, config: dict, out: Path, epochs: int, lr: float,
                 batch_size: int, max_length: int, train_size, test_size, seed: int, progress: bool,
                 text_column: str = "text", label_column: str = "label", format: str = "native",
                 overwrite: bool = False, name: str = "adapter") -> dict:
    """Load data and base, add an adapter, measure, train, measure, save. Returns a summary."""
    from .basemodels import classifier_head, load_classifier
    from .config import config_from_dict
    from .data import load_dataset, split
    from .methods import method_spec
    from .model import AdapterModel
    from .training import evaluate, train_adapter

    start = time.perf_counter()
    method = config_from_dict(config, where="adapter config").method  # fail fast, before any loading
    if format == "peft":
        from .formats.peft import PEFT_TYPES
        if method not in PEFT_TYPES.values():
            raise CLIError(f"PEFT's format cannot hold a {method} adapter (only {sorted(PEFT_TYPES.values())}); "
                           f"use --format native")
    out = Path(out)
    target = out / ADAPTER_DIR
    if target.exists() and not overwrite:
        raise CLIError(f"{target}: already exists; choose another --out or pass --overwrite")
    if target.exists() and not _is_adapter_folder(target):
        raise CLIError(f"{target}: exists and is not an adapter folder; refusing to replace it")
    data = load_dataset(data_spec, text_column, label_column)
    train, test = split(data, test_size=test_size, train_size=train_size, seed=seed)
    if len(train) == 0:
        raise CLIError(f"{data.name}: the split leaves no training examples (--train-size {train_size})")
    net, tokenizer = load_classifier(model, len(data.label_names), data.label_names, seed=seed)
    config = dict(config)
    head = classifier_head(net)
    if "modules_to_save" not in config and head is not None:
        config["modules_to_save"] = [head]
    cfg = config_from_dict(config, where="adapter config")
    pm = AdapterModel(net)
    pm.add_adapter(name, cfg)
    counts = pm.parameter_counts(name)
    progress_kw = {"max_length": max_length, "progress": progress}
    before = evaluate(pm, test, tokenizer, **progress_kw) if len(test) else None
    metrics = train_adapter(pm, name, train, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size,
                            seed=seed, **progress_kw)
    after = evaluate(pm, test, tokenizer, **progress_kw) if len(test) else None
    record = pm.record(name)
    record.provenance.update({
        "data": data_spec if data_spec in ("bbc", "tweets") else str(Path(data_spec).resolve()),
        "text_column": text_column, "label_column": label_column,
        "base_model": str(model),
        "split": {"seed": seed, "test_size": test_size, "train_size": train_size,
                  "n_train": len(train), "n_test": len(test)},
        "metrics": {**record.provenance.get("metrics", {}),
                    **({"test_accuracy": after["accuracy"], "test_loss": after["loss"],
                        "test_accuracy_before": before["accuracy"]} if after else {})},
    })
    saved = pm.save_adapter(name, target, format=format, overwrite=overwrite)
    elapsed = time.perf_counter() - start
    summary = {
        "adapter": str(saved), "format": format, "method": cfg.method, "config": record.config.to_dict(),
        "sites": len(record.sites), "level": method_spec(cfg.method).level, "model": str(model), "data": data.name,
        "label_names": data.label_names, "n_train": len(train), "n_test": len(test),
        "accuracy_before": before["accuracy"] if before else None, "loss_before": before["loss"] if before else None,
        "accuracy_after": after["accuracy"] if after else None, "loss_after": after["loss"] if after else None,
        "trainable_parameters": counts["adapter"], "base_parameters": counts["base"],
        "trainable_share": counts["share"], "training": metrics, "seconds": round(elapsed, 1),
        "library_version": __version__,
    }
    _write_json(out / METRICS_FILE, summary)
    return summary


def _where(method: str, sites: int, level: str | None, saved: list[str] | None) -> str:
    text = f"{method} " + ("on the input embeddings" if level == "input" else f"at {sites} sites")
    return text + (f" + {', '.join(saved)} (trained in full)" if saved else "")


def _print_summary(s: dict, title: str) -> None:
    rows = [
        ("data", (f"{s['data']}: {s['n_train']} train / {s['n_test']} held-out test, "
                  f"{len(s['label_names'])} classes")),
        ("adapter", _where(s["method"], s["sites"], s.get("level"), s["config"].get("modules_to_save"))),
        ("trainable parameters", (f"{s['trainable_parameters']:,} of {s['base_parameters']:,} "
                                  f"({_pct(s['trainable_share'])})")),
    ]
    if s["accuracy_after"] is not None:
        rows += [
            ("accuracy before", f"{s['accuracy_before']:.3f}  (loss {s['loss_before']:.3f})"),
            (f"accuracy after {s['training']['epochs']} epoch(s)",
             f"{s['accuracy_after']:.3f}  (loss {s['loss_after']:.3f})"),
        ]
    rows += [
        ("time", f"{s['seconds']:.0f} s in all, {s['training']['train_seconds']:.0f} s training"),
        ("saved to", f"{s['adapter']}  (metrics: {Path(s['adapter']).parent / METRICS_FILE})"),
    ]
    print(f"\n{title}\n" + _table(rows), flush=True)


def cmd_quickstart(args) -> int:
    q = QUICKSTART
    out = Path(args.out)
    print(f"polyadapter quickstart: rank-{q['config']['r']} LoRA on MiniLM's query/value + a new classifier "
          f"head,\nBBC News topics ({args.train_size} training articles, {args.epochs} epoch(s), "
          f"max {args.max_length} tokens). The first pass measures the untrained head.", flush=True)
    summary = run_training(
        model=q["model"], data_spec=q["data"], config=q["config"], out=out, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, max_length=args.max_length, train_size=args.train_size,
        test_size=args.test_size, seed=args.seed, progress=not args.quiet,
        overwrite=True)  # the quickstart's own folder: a re-run replaces the previous adapter
    _print_summary(summary, "quickstart: done")
    print(f"\nnext: polyadapter info {summary['adapter']}\n"
          f"      polyadapter eval --adapter {out} --data bbc", flush=True)
    return 0


def cmd_train(args) -> int:
    config = _read_config(args.config)
    config.update(_parse_set(args.set))
    method = args.method or config.get("method")
    if method is None:
        raise CLIError("no method: pass --method (lora, ia3, ...) or put \"method\" in --config")
    if args.method and config.get("method") not in (None, args.method):
        raise CLIError(f"--method {args.method} contradicts method {config['method']!r} in {args.config}")
    config["method"] = method
    summary = run_training(
        model=args.model, data_spec=args.data, config=config, out=Path(args.out), epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, train_size=args.train_size,
        test_size=args.test_size, seed=args.seed, progress=not args.quiet, text_column=args.text_column,
        label_column=args.label_column, format=args.format, overwrite=args.overwrite, name=args.name)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, f"train: {method} adapter done")
    return 0


# ============================================================================ eval
def cmd_eval(args) -> int:
    from .basemodels import load_classifier
    from .data import load_dataset, relabel, split
    from .model import AdapterModel
    from .training import evaluate

    path = adapter_folder(args.adapter)
    desc = describe(path)  # validates the folder before the model loads
    prov = desc.get("provenance") or {}
    data = load_dataset(args.data, args.text_column, args.label_column)
    label_names = prov.get("label_names") or data.label_names
    data = relabel(data, label_names)
    same_data = prov.get("data") in (args.data, str(Path(args.data).resolve()))
    saved_split = prov.get("split", {}) if same_data else {}
    if args.all:
        part, what = data, "all rows"
    else:
        # By default the held-out part of the split the adapter was trained with, when known.
        test_size = args.test_size if args.test_size is not None else saved_split.get("test_size", 0.2)
        seed = args.seed if args.seed is not None else saved_split.get("seed", 0)
        _, part = split(data, test_size=test_size, seed=seed)
        what = f"held-out test split (test_size {test_size}, seed {seed})"
    if len(part) == 0:
        raise CLIError(f"{data.name}: nothing to evaluate (the test split is empty); pass --all or --test-size")
    model = args.model or prov.get("base_model") or "minilm"
    net, tokenizer = load_classifier(model, len(label_names), label_names, seed=0)
    pm = AdapterModel(net)
    record = pm.load_adapter(path)
    max_length = args.max_length or (prov.get("training") or {}).get("max_length") or 128
    result = evaluate(pm, part, tokenizer, batch_size=args.batch_size, max_length=max_length,
                      progress=not args.quiet)
    result.update({"adapter": str(path), "method": record.config.method, "data": data.name, "split": what,
                   "model": str(model), "max_length": max_length})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table([("adapter", f"{path} ({record.config.method})"), ("data", f"{data.name}, {what}"),
                      ("examples", str(result["n"])), ("accuracy", f"{result['accuracy']:.4f}"),
                      ("loss", f"{result['loss']:.4f}")]))
    return 0


# ============================================================================ info
def describe(path: str | Path) -> dict:
    """What an adapter folder (native or PEFT) holds, read from its files only."""
    from .errors import LoadError
    from .formats import detect_format
    from .formats.files import read_json

    path = adapter_folder(path)
    fmt = detect_format(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    if fmt == "native":
        from .formats import native
        meta = native.read_meta(path)
        config = meta.get("config") or {}
        tensors = _safetensors_shapes(native.weights_file(path, meta))
        base = meta.get("base_model") or {}
        n_params = meta.get("num_parameters", sum(_numel(s) for s in tensors.values()))
        return {
            "path": str(path), "format": "native", "name": meta.get("name"), "method": config.get("method"),
            "targets": config.get("targets"), "modules_to_save": meta.get("modules_to_save", []),
            "sites": len(meta.get("sites", [])), "parameters": n_params,
            "share_of_base": n_params / base["num_parameters"] if base.get("num_parameters") else None,
            "tensors": len(tensors), "size_bytes": size, "config": config, "base_model": base,
            "library_version": meta.get("library_version"), "provenance": meta.get("provenance", {}),
        }
    config = read_json(path / "adapter_config.json")
    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise LoadError(f"{path}: adapter_model.safetensors not found")
    tensors = _safetensors_shapes(weights)
    markers = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "ia3_l", "lora_magnitude_vector")
    sites = {k.split(f".{m}")[0] for k in tensors for m in markers if f".{m}" in k}
    return {
        "path": str(path), "format": "peft", "name": path.name, "method": str(config.get("peft_type", "?")).lower(),
        "targets": config.get("target_modules"), "modules_to_save": config.get("modules_to_save") or [],
        "sites": len(sites), "parameters": sum(_numel(s) for s in tensors.values()), "share_of_base": None,
        "tensors": len(tensors), "size_bytes": size, "config": config,
        "base_model": {"name_or_path": config.get("base_model_name_or_path")},
        "library_version": config.get("peft_version"), "provenance": {},
    }


def _level(method: str | None) -> str | None:
    from .methods import METHODS
    return METHODS[method].level if method in METHODS else None


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors header alone."""
    from safetensors import safe_open

    from .errors import LoadError
    if not path.is_file():
        raise LoadError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise LoadError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def cmd_info(args) -> int:
    d = describe(args.path)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    base = d["base_model"] or {}
    if d["format"] == "native":
        base_text = (f"{base.get('class')} ({base.get('model_type')}), {base.get('num_parameters', 0):,} parameters, "
                     f"structure {base.get('structure_sha256')}, weights {base.get('weights_sha256')}"
                     if base else "unknown (converted without a base model)")
    else:
        base_text = base.get("name_or_path") or "unknown"
    params = f"{d['parameters']:,}" + (f" ({_pct(d['share_of_base'])} of the base)" if d["share_of_base"] else "")
    targets = d["targets"] if isinstance(d["targets"], str) else ", ".join(d["targets"] or [])
    rows = [
        ("path", d["path"]), ("format", d["format"] + (f" (written by {d['library_version']})"
                                                       if d["library_version"] else "")),
        ("name", str(d["name"])), ("method", str(d["method"])), ("targets", targets or "-"),
        ("modules to save", ", ".join(d["modules_to_save"]) or "-"),
        ("sites", str(d["sites"]) + (" (acts on the input embeddings)" if _level(d["method"]) == "input" else "")),
        ("parameters", params), ("tensors", str(d["tensors"])), ("size on disk", _human_bytes(d["size_bytes"])),
        ("base model", base_text),
    ]
    skip = {"method", "targets", "modules_to_save"}
    extra = {k: v for k, v in d["config"].items() if k not in skip} if d["format"] == "native" else {}
    if extra:
        rows.append(("config", ", ".join(f"{k}={v}" for k, v in extra.items())))
    for key, value in (d["provenance"] or {}).items():
        rows.append((f"provenance.{key}", json.dumps(value) if isinstance(value, (dict, list)) else str(value)))
    print(_table(rows))
    return 0


# ============================================================================ convert, methods
def cmd_convert(args) -> int:
    from . import formats
    convert = getattr(formats, "convert", None)
    if convert is None:
        raise CLIError("this polyadapter has no format converter (polyadapter.formats.convert)")
    src = adapter_folder(args.src)
    try:
        dst = convert(src, Path(args.dst), args.to, overwrite=args.overwrite)
    except ValueError as e:  # e.g. the folder is already in that format
        if isinstance(e, PolyAdapterError):
            raise
        raise CLIError(str(e)) from None
    print(f"converted {src} -> {dst} ({args.to} format)")
    return 0


def method_table() -> list[dict]:
    from .methods import METHODS
    out = []
    for name, spec in sorted(METHODS.items()):
        fields = {}
        for f in dataclasses.fields(spec.config_cls):
            if f.default is not dataclasses.MISSING:
                fields[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                fields[f.name] = f.default_factory()
            else:
                fields[f.name] = None
        doc = (spec.config_cls.__doc__ or "").strip()
        out.append({"name": name, "summary": spec.summary, "level": spec.level, "fields": fields,
                    "doc": "" if doc.startswith(spec.config_cls.__name__ + "(") else doc})
    return out


def cmd_methods(args) -> int:
    table = method_table()
    if args.json:
        print(json.dumps(table, indent=2, default=str))
        return 0
    for m in table:
        print(f"{m['name']:<11} {m['summary']}")
        fields = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in m["fields"].items())
        print(f"{'':<11} fields: {fields}")
    print("\nset fields with: polyadapter train --method NAME --set key=value ... (or --config FILE.json)")
    return 0


# ============================================================================ parser, main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyadapter", description="Adapters on any frozen PyTorch model: train, evaluate, inspect, convert.")
    parser.add_argument("--version", action="version", version=f"polyadapter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    q = sub.add_parser("quickstart", help="train a LoRA adapter on MiniLM for BBC News topics (a few minutes on CPU)",
                       description="Rank-8 LoRA on MiniLM's query/value + a new classifier head, BBC News "
                                   "5-way; prints accuracy before and after on a held-out split.")
    q.add_argument("--out", default="runs/quickstart", help="run folder (default: %(default)s)")
    _add_run_args(q, QUICKSTART)
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train an adapter for text classification",
                       description="Train an adapter (plus the classifier head, unless the config sets "
                                   "modules_to_save) and save it with its metrics under --out.")
    t.add_argument("--model", default="minilm", help="'minilm' (packaged) or a local Hugging Face model folder")
    _add_data_args(t)
    t.add_argument("--method", help="lora, ia3, ... (see: polyadapter methods)")
    t.add_argument("--config", help="JSON file of config fields (may include \"method\")")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="a config field; the value is parsed as JSON when it can be (r=16, "
                        "'targets=[\"query\",\"value\"]'); repeatable")
    t.add_argument("--out", required=True, help="run folder: the adapter goes to OUT/adapter, metrics to OUT/metrics.json")
    t.add_argument("--name", default="adapter", help="adapter name stored in the file (default: %(default)s)")
    t.add_argument("--format", choices=("native", "peft"), default="native", help="adapter file format")
    t.add_argument("--overwrite", action="store_true", help="replace OUT/adapter if it exists")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_run_args(t, {**QUICKSTART, "train_size": None, "test_size": 0.2})
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy of an adapter on labelled data",
                       description="Load a base model and an adapter (native or PEFT folder, or a run folder) "
                                   "and measure accuracy. By default it uses the held-out split the adapter "
                                   "was trained with when the data is the same.")
    e.add_argument("--model", help="base model: 'minilm' or a folder (default: the one the adapter was trained on)")
    e.add_argument("--adapter", required=True, help="adapter folder or run folder")
    _add_data_args(e)
    e.add_argument("--all", action="store_true", help="evaluate on every row, not a held-out split")
    e.add_argument("--test-size", type=_size, help="held-out split size (default: as in training, else 0.2)")
    e.add_argument("--seed", type=int, help="split seed (default: as in training, else 0)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-length", type=int, help="default: as in training, else 128")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="describe an adapter folder (native or PEFT)")
    i.add_argument("path", help="adapter folder or run folder")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert an adapter folder between the native and PEFT formats")
    c.add_argument("--to", required=True, choices=("peft", "native"))
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    c.set_defaults(func=cmd_convert)

    from .cli_reuse import add_parsers  # combine, compress, merge, lorahub
    add_parsers(sub)

    m = sub.add_parser("methods", help="list adapter methods and their config fields")
    m.add_argument("--json", action="store_true", help="print as JSON")
    m.set_defaults(func=cmd_methods)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"polyadapter: warning: {message}", file=sys.stderr if file is None else file)


def _run(args) -> int:
    try:
        return args.func(args)
    except PolyAdapterError as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"polyadapter {args.command}: error: {message}", file=sys.stderr)
        return 2
    except FileExistsError as e:  # write_folder refuses to replace a folder
        print(f"polyadapter {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"polyadapter {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
