"""The training verbs: quickstart, train, eval (``train --task causal-lm`` lives in train_lm.py)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .._version import __version__
from ..causal_lm import DATA_HELP as LM_DATA_HELP
from .common import (
    DATA_HELP,
    METRICS_FILE,
    SEED,
    CLIError,
    _add_data_args,
    _add_run_args,
    _parse_set,
    _pct,
    _read_config,
    _size,
    _table,
    _write_json,
    add_store_arg,
    check_format,
    check_max_length,
    check_out,
    count,
    fill_defaults,
)
from .describe import read_source
from .train_lm import DEFAULTS as LM_DEFAULTS
from .train_lm import HELP as LM_HELP
from .train_lm import cmd_train_lm

QUICKSTART = {
    "model": "minilm", "data": "bbc",
    "config": {"method": "lora", "r": 8, "alpha": 16.0, "targets": ["query", "value"],
               "modules_to_save": ["classifier"]},
    "train_size": 600, "test_size": 300, "epochs": 1, "lr": 5e-3, "batch_size": 8, "max_length": 128,
}


def run_training(*, model: str, data_spec: str, config: dict, out, epochs: int, lr: float,
                 batch_size: int, max_length: int, train_size, test_size, seed: int, progress: bool,
                 text_column: str = "text", label_column: str = "label", format: str = "native",
                 overwrite: bool = False, name: str = "adapter", store: str | None = None) -> dict:
    """Load data and base, add an adapter, measure, train, measure, save. Returns a summary.
    ``out``: a run folder (OUT/adapter + OUT/metrics.json), or ``store:NAME`` (the next
    version of NAME in the adapter store; the metrics then live in its provenance)."""
    from ..basemodels import classifier_head, load_classifier
    from ..data import load_dataset, split
    from ..distributed import world_size
    from ..methods import config_from_dict, method_spec
    from ..model import AdapterModel
    from ..names import check_name
    from ..training import evaluate, train_adapter

    start = time.perf_counter()
    method = config_from_dict(config, where="adapter config").method  # fail fast, before any loading
    check_format(format, method)
    check_name(name, "--name")
    to_store, target = check_out(out, store, overwrite)
    data = load_dataset(data_spec, text_column, label_column)
    train, test = split(data, test_size=test_size, train_size=train_size, seed=seed)
    if len(train) == 0:
        raise CLIError(f"{data.name}: the split leaves no training examples (--train-size {train_size})")
    net, tokenizer = load_classifier(model, len(data.label_names), data.label_names, seed=seed)
    check_max_length(net, max_length)
    config = dict(config)
    head = classifier_head(net)
    if "modules_to_save" not in config and head is not None:
        config["modules_to_save"] = [head]
    cfg = config_from_dict(config, where="adapter config")
    pm = AdapterModel(net)
    pm.add_adapter(name, cfg)
    counts = pm.parameter_counts(name)
    progress_kw = {"max_length": max_length, "progress": progress}
    main = _is_main()  # with several processes (--processes), the main one measures and saves
    before = evaluate(pm, test, tokenizer, **progress_kw) if len(test) and main else None
    metrics = train_adapter(pm, name, train, tokenizer, epochs=epochs, lr=lr, batch_size=batch_size,
                            seed=seed, **progress_kw)
    if not main:
        return None
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
    saved = pm.save_adapter(name, target, format=format, overwrite=overwrite, store=store)
    elapsed = time.perf_counter() - start
    summary = {
        "adapter": f"store:{saved.ref}" if to_store else str(saved), "format": format, "method": cfg.method, "config": record.config.to_dict(),
        "sites": len(record.sites), "level": method_spec(cfg.method).level, "model": str(model), "data": data.name,
        "label_names": data.label_names, "n_train": len(train), "n_test": len(test),
        "accuracy_before": before["accuracy"] if before else None, "loss_before": before["loss"] if before else None,
        "accuracy_after": after["accuracy"] if after else None, "loss_after": after["loss"] if after else None,
        "trainable_parameters": counts["adapter"], "base_parameters": counts["base"],
        "trainable_share": counts["share"], "training": metrics, "seconds": round(elapsed, 1),
        "processes": world_size(), "library_version": __version__,
    }
    if not to_store:
        _write_json(Path(out) / METRICS_FILE, summary)
    return summary


def _is_main() -> bool:
    """False in the non-main processes of a launched run (RANK > 0)."""
    import os
    return int(os.environ.get("RANK", "0")) == 0


def relaunch_if_asked(args) -> int | None:
    """``--processes N`` (N > 1) outside a launched run: run this same command as N
    processes through accelerate's launcher and return its exit code; else None."""
    from ..distributed import relaunch, world_size
    if getattr(args, "processes", 1) <= 1 or world_size() > 1:
        return None
    if args.batch_size % args.processes:
        raise CLIError(f"--batch-size {args.batch_size} must be a multiple of --processes {args.processes} "
                       f"(the batch size is the global batch, split evenly)")
    return relaunch(args.processes, args.argv)


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
        ("saved to", s["adapter"] + ("  (metrics in its provenance)" if s["adapter"].startswith("store:") else
                                     f"  (metrics: {Path(s['adapter']).parent / METRICS_FILE})")),
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
    code = relaunch_if_asked(args)
    if code is not None:
        return code
    if args.task == "causal-lm":
        return cmd_train_lm(args, config)
    given = [o for o, v in (("--steps", args.steps), ("--rank", args.rank)) if v is not None]
    if given:
        raise CLIError(f"{' and '.join(given)}: only for --task causal-lm (a classifier's LoRA rank: --set r=N)")
    fill_defaults(args, {"model": "minilm", **{k: QUICKSTART[k] for k in ("epochs", "lr", "max_length")}})
    method = args.method or config.get("method")
    if method is None:
        raise CLIError("no method: pass --method (lora, ia3, ...) or put \"method\" in --config")
    if args.method and config.get("method") not in (None, args.method):
        raise CLIError(f"--method {args.method} contradicts method {config['method']!r} in {args.config}")
    config["method"] = method
    summary = run_training(
        model=args.model, data_spec=args.data, config=config, out=args.out, epochs=args.epochs,
        lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, train_size=args.train_size,
        test_size=args.test_size, seed=args.seed, progress=not args.quiet, text_column=args.text_column,
        label_column=args.label_column, format=args.format, overwrite=args.overwrite, name=args.name,
        store=args.store)
    if summary is None:  # a non-main process of --processes N: the main one reports
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, f"train: {method} adapter done")
    return 0


# ============================================================================ eval
def cmd_eval(args) -> int:
    from ..basemodels import load_classifier
    from ..data import load_dataset, relabel, split
    from ..model import AdapterModel
    from ..training import evaluate

    source = read_source(args.adapter, args.store)  # checks the folder (or stored version) before the model loads
    path = source.spec
    prov = source.provenance
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
    record = pm.load_adapter(path, store=args.store)
    max_length = args.max_length or (prov.get("training") or {}).get("max_length") or 128
    check_max_length(net, max_length)
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


# ---------------------------------------------------------------------- parser
def add_parsers(sub) -> None:
    q = sub.add_parser("quickstart", help="train a LoRA adapter on MiniLM for BBC News topics (a few minutes on CPU)",
                       description="Rank-8 LoRA on MiniLM's query/value + a new classifier head, BBC News "
                                   "5-way; prints accuracy before and after on a held-out split.")
    q.add_argument("--out", default="runs/quickstart", help="run folder (default: %(default)s)")
    _add_run_args(q, QUICKSTART)
    q.set_defaults(func=cmd_quickstart)

    t = sub.add_parser("train", help="train an adapter for text classification, or a causal-LM LoRA",
                       description="Train an adapter (plus the classifier head, unless the config sets "
                                   "modules_to_save) and save it with its metrics under --out. With --task "
                                   "causal-lm: a LoRA on a causal language model, trained on chat data with "
                                   "the loss on the answers.")
    t.add_argument("--task", choices=("classification", "causal-lm"), default="classification",
                   help="default: %(default)s")
    t.add_argument("--model", help="'minilm' (packaged) or a local Hugging Face model folder; causal-lm: "
                                   "'smollm2' (packaged SmolLM2-135M, the default) or a local causal-LM folder")
    _add_data_args(t, help=f"{DATA_HELP}; causal-lm: {LM_DATA_HELP}")
    t.add_argument("--method", help="lora, ia3, ... (see: polyadapter methods); causal-lm: lora")
    t.add_argument("--config", help="JSON file of config fields (may include \"method\")")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="a config field; the value is parsed as JSON when it can be (r=16, "
                        "'targets=[\"query\",\"value\"]'); repeatable")
    t.add_argument("--out", required=True, help="run folder: the adapter goes to OUT/adapter, metrics to "
                                                "OUT/metrics.json; or store:NAME (the next version in the store)")
    add_store_arg(t)
    t.add_argument("--name", default="adapter", help="adapter name stored in the file (default: %(default)s)")
    t.add_argument("--format", choices=("native", "peft"), default="native", help="adapter file format")
    t.add_argument("--overwrite", action="store_true", help="replace OUT/adapter if it exists")
    t.add_argument("--json", action="store_true", help="print the summary as JSON")
    t.add_argument("--processes", type=count(1, 1024), default=1,
                   help="train data parallel in N processes on this machine: DDP over the adapter's parameters "
                        "through accelerate's launcher (gloo on CPU, NCCL on GPUs, one GPU per process); "
                        "--batch-size is the global batch (default: 1)")
    _add_run_args(t, {**QUICKSTART, "train_size": None, "test_size": 0.2}, {"causal-lm": LM_HELP})
    lm = t.add_argument_group("causal-lm (--task causal-lm)")
    lm.add_argument("--steps", type=count(1, 10_000_000),
                    help=f"batches to train (default: {LM_DEFAULTS['steps']}, or --epochs passes; both: "
                         f"the fewer)")
    lm.add_argument("--rank", type=count(1, 4096), help=f"LoRA rank (default: {LM_DEFAULTS['rank']}; alpha: 2 x rank)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="accuracy of an adapter on labelled data",
                       description="Load a base model and an adapter (native or PEFT folder, or a run folder) "
                                   "and measure accuracy. By default it uses the held-out split the adapter "
                                   "was trained with when the data is the same.")
    e.add_argument("--model", help="base model: 'minilm' or a folder (default: the one the adapter was trained on)")
    e.add_argument("--adapter", required=True, help="adapter folder, run folder, or store:NAME[@VERSION|@ALIAS]")
    add_store_arg(e)
    _add_data_args(e)
    e.add_argument("--all", action="store_true", help="evaluate on every row, not a held-out split")
    e.add_argument("--test-size", type=_size, help="held-out split size (default: as in training, else 0.2)")
    e.add_argument("--seed", type=SEED, help="split seed (default: as in training, else 0)")
    e.add_argument("--batch-size", type=count(1, 65_536), default=32)
    e.add_argument("--max-length", type=count(1, 1_000_000), help="default: as in training, else 128")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=cmd_eval)
