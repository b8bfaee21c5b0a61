"""Command-line verbs that reuse adapters: combine, compress, merge, lorahub.

Each loads a base model and the given adapter folders (native or PEFT), runs one
operation from :mod:`polyadapter.ops`, and writes the result — an ordinary adapter
folder (``polyadapter info`` shows its provenance) or, for ``merge``, a plain model
folder with the adapters baked in.

    polyadapter combine runs/bbc runs/tweets --method ties --weights 1 1 --density 0.5 --out merged
    polyadapter compress runs/bbc --method svd --rank 2 --out bbc-r2
    polyadapter compress runs/bbc --method compeft --density 0.1 --out bbc-compeft
    polyadapter compress runs/a runs/b runs/c --method shared-basis --rank 8 --out library
    polyadapter merge runs/bbc --out bbc-model
    polyadapter lorahub runs/a runs/b runs/c --data bbc --shots 32 --out hub
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..names import safe_name
from .common import (SEED, SHARE, WEIGHT, CLIError, _add_data_args, _table, add_store_arg, check_store_out, count,
                     is_store_ref)
from .describe import read_source


# ---------------------------------------------------------------------- loading
def load_with_adapters(paths: list[str], model: str | None, heads_from: int = 0, store: str | None = None):
    """(AdapterModel, tokenizer, adapter names, label names or None): the base model the
    ``heads_from``-th adapter was trained on (or ``model``) with every source — a folder
    or a ``store:`` reference — loaded under its own name; the label names are that
    adapter's, from its provenance."""
    from ..basemodels import load_classifier
    from ..model import AdapterModel

    if not 0 <= heads_from < len(paths):
        raise CLIError(f"--heads-from {heads_from}: there are {len(paths)} adapters, so it must be 0 to "
                       f"{len(paths) - 1}")
    sources = [read_source(p, store) for p in paths]  # every source checked before the model loads
    prov = sources[heads_from].provenance
    label_names = prov.get("label_names")
    num_labels = len(label_names) if label_names else _head_width(sources[heads_from].shapes) or 2
    net, tokenizer = load_classifier(model or prov.get("base_model") or "minilm", num_labels, label_names, seed=0)
    pm = AdapterModel(net)
    names = []
    for source in sources:
        name = _free_name(pm, source.name)
        pm.load_adapter(source.spec, name=name, activate=False, store=store)
        names.append(name)
    return pm, tokenizer, names, label_names


def _head_width(shapes: dict) -> int | None:
    for key, shape in shapes.items():
        if re.search(r"classifier(\.module)?\.weight$", key) and len(shape) == 2:
            return shape[0]
    return None


def _free_name(pm, name: str) -> str:
    base = safe_name(str(name)[:60], fallback="adapter")
    out, i = base, 1
    while out in pm.adapters:
        i += 1
        out = f"{base}-{i}"
    return out


def _check_out(args, kind: str = "adapter") -> None:
    """Refuse an --out that cannot be written before anything is loaded."""
    if is_store_ref(args.out):
        if kind != "adapter":
            raise CLIError(f"--out {args.out}: this verb writes a {kind} folder, not an adapter; give a folder")
        check_store_out(args.out, args.store)
        return
    from ..formats.folders import check_destination
    check_destination(Path(args.out), args.overwrite, kind=kind)


def _save(pm, name: str, args) -> str:
    """Save the result to --out (a folder, or the store) and say where it went."""
    saved = pm.save_adapter(name, args.out, format=args.format, overwrite=args.overwrite, store=args.store)
    return f"store:{saved.ref}" if is_store_ref(args.out) else str(saved)


def _report(args, rows: list[tuple[str, str]], data: dict) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else _table(rows))


# ---------------------------------------------------------------------- verbs
def cmd_combine(args) -> int:
    from ..ops.combine import combine
    if args.weights is not None and len(args.weights) != len(args.adapters):
        raise CLIError(f"--weights has {len(args.weights)} values for {len(args.adapters)} adapters")
    _check_out(args)
    pm, _, names, _ = load_with_adapters(args.adapters, args.model, args.heads_from, args.store)
    weights = args.weights or [1.0 / len(names)] * len(names)
    opts = {k: v for k, v in (("rank", args.rank), ("density", args.density), ("seed", args.seed)) if v is not None}
    if args.majority_sign:
        opts["majority_sign"] = args.majority_sign
    record = combine(pm, "combined", names, weights, args.method, modules_from=names[args.heads_from], **opts)
    path = _save(pm, "combined", args)
    _report(args, [("combined", ", ".join(f"{n} x {w:g}" for n, w in zip(names, weights))),
                   ("method", args.method), ("rank", str(record.config.r)), ("written", str(path))],
            {"path": str(path), **record.provenance})
    return 0


def cmd_compress(args) -> int:
    if args.method == "shared-basis":
        return _shared_basis(args)
    if len(args.adapters) != 1:
        raise CLIError(f"--method {args.method} compresses one adapter; found {len(args.adapters)}")
    _check_out(args)
    from ..ops.compress import compeft, svd_compress
    pm, _, (name,), _ = load_with_adapters(args.adapters, args.model, store=args.store)
    if args.method == "svd":
        if (args.rank is None) == (args.energy is None):
            raise CLIError("--method svd needs exactly one of --rank or --energy")
        record = svd_compress(pm, name, "compressed", rank=args.rank, energy=args.energy)
    else:
        if args.rank is not None or args.energy is not None:
            raise CLIError("--method compeft takes --density, not --rank or --energy")
        record = compeft(pm, name, "compressed", density=args.density if args.density is not None else 0.1)
    path = _save(pm, "compressed", args)
    prov = record.provenance
    _report(args, [("source", name), ("method", args.method),
                   ("storage ratio", f"{prov.get('storage_ratio', float('nan')):.1f}x"), ("written", str(path))],
            {"path": str(path), **prov})
    return 0


def _shared_basis(args) -> int:
    from ..ops.shared_basis import compress_to_shared_basis
    if args.rank is None:
        raise CLIError("--method shared-basis needs --rank (the shared basis size k)")
    if is_store_ref(args.out):
        raise CLIError(f"--out {args.out}: shared-basis writes several adapters that name each other (the basis "
                       f"and one per source); write them to a folder, then `polyadapter store add` each")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"{out}: is a file; --out of shared-basis is a folder that gets one adapter folder per result")
    from ..formats.folders import check_destination
    check_destination(out / "basis", args.overwrite)
    pm, _, names, _ = load_with_adapters(args.adapters, args.model, store=args.store)
    summary = compress_to_shared_basis(pm, names, "basis", rank=args.rank, suffix="-jd")
    written = [pm.save_adapter("basis", out / "basis", overwrite=args.overwrite)]
    for n in names:
        written.append(pm.save_adapter(f"{n}-jd", out / f"{n}-jd", overwrite=args.overwrite))
    _report(args, [("sources", ", ".join(names)), ("shared basis rank", str(args.rank)),
                   ("storage ratio", f"{summary['storage_ratio']:.1f}x"),
                   ("written", ", ".join(str(w) for w in written))],
            {"written": [str(w) for w in written], **summary})
    return 0


def cmd_merge(args) -> int:
    from ..formats.folders import replace_folder
    _check_out(args, kind="model")
    pm, tokenizer, names, _ = load_with_adapters(args.adapters, args.model, store=args.store)
    model = pm.merge_and_unload(*names)
    out = Path(args.out)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    replace_folder(out, fill, overwrite=args.overwrite, kind="model")
    _report(args, [("merged", ", ".join(names)), ("model folder", str(out))],
            {"merged": names, "path": str(out)})
    return 0


def cmd_lorahub(args) -> int:
    from ..data import load_dataset, relabel, split
    from ..ops.lorahub import lorahub
    _check_out(args)
    pm, tokenizer, names, label_names = load_with_adapters(args.adapters, args.model, args.heads_from, args.store)
    data = load_dataset(args.data, args.text_column, args.label_column)
    if label_names:
        data = relabel(data, label_names)
    _, shots = split(data, test_size=args.shots, seed=args.seed)
    enc = tokenizer(list(shots.texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    import torch
    examples = [{**enc, "labels": torch.tensor(list(shots.labels))}]
    record = lorahub(pm, "lorahub", names, examples, budget=args.budget, seed=args.seed,
                     modules_from=names[args.heads_from], progress=not args.quiet)
    path = _save(pm, "lorahub", args)
    prov = record.provenance
    _report(args, [("weights", ", ".join(f"{n}: {w:+.3f}" for n, w in zip(names, prov["weights"]))),
                   ("few-shot loss", json.dumps(prov.get("loss"))), ("written", str(path))],
            {"path": str(path), **{k: v for k, v in prov.items() if k != "history"}})
    return 0


# ---------------------------------------------------------------------- parser
def add_parsers(sub) -> None:
    def common(p, formats=True):
        p.add_argument("adapters", nargs="+",
                       help="adapter folders (native or PEFT), run folders, or store:NAME[@VERSION|@ALIAS]")
        p.add_argument("--model", help="base model: 'minilm' or a folder (default: the first adapter's base)")
        p.add_argument("--out", required=True, help="output folder, or store:NAME (the next version in the store)")
        if formats:
            p.add_argument("--format", choices=("native", "peft"), default="native")
        p.add_argument("--overwrite", action="store_true", help="replace the output folder")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        add_store_arg(p)

    c = sub.add_parser("combine", help="combine adapters into one (linear, TIES, DARE, SVD, ...)",
                       description="Combine LoRA (or IA3) adapters into a new adapter. Methods: linear, cat, "
                                   "task_arithmetic, svd, ties, dare_linear, dare_ties, magnitude_prune and the "
                                   "*_svd variants of the last four.")
    common(c)
    c.add_argument("--method", default="linear")
    c.add_argument("--weights", type=WEIGHT, nargs="+", help="one per adapter (default: uniform)")
    c.add_argument("--rank", type=count(1, 65_536), help="target rank (svd methods)")
    c.add_argument("--density", type=SHARE, help="share of entries kept (ties, dare, magnitude_prune)")
    c.add_argument("--majority-sign", choices=("total", "frequency"), help="TIES sign election")
    c.add_argument("--seed", type=SEED, help="DARE's random drop")
    c.add_argument("--heads-from", type=count(0, 10_000), default=0, metavar="I",
                   help="copy the I-th adapter's modules_to_save (e.g. its head) into the result (default 0)")
    c.set_defaults(func=cmd_combine)

    z = sub.add_parser("compress", help="shrink adapters: SVD rank cut, ComPEFT, shared basis",
                       description="svd: truncated SVD to --rank or to the --energy kept; compeft: keep the "
                                   "top --density share of every tensor as signs with one scale per tensor "
                                   "(stored bit-packed); shared-basis: several LoRAs into one basis of rank "
                                   "--rank plus a small matrix per adapter.")
    common(z)
    z.add_argument("--method", choices=("svd", "compeft", "shared-basis"), required=True)
    z.add_argument("--rank", type=count(1, 65_536))
    z.add_argument("--energy", type=SHARE, help="share of squared singular values kept (svd)")
    z.add_argument("--density", type=SHARE, help="share of entries kept (compeft; default 0.1)")
    z.set_defaults(func=cmd_compress)

    m = sub.add_parser("merge", help="bake adapters into the base and save a plain model folder",
                       description="Merge the adapters' updates (and their head copies) into the base weights "
                                   "and save the result with save_pretrained (safetensors).")
    common(m, formats=False)
    m.set_defaults(func=cmd_merge)

    h = sub.add_parser("lorahub", help="find a combination of LoRAs for a task from a few examples (no gradients)",
                       description="LoraHub: search one weight per LoRA with a gradient-free optimiser "
                                   "(nevergrad) to minimise the loss on --shots labelled examples.")
    common(h)
    _add_data_args(h)
    h.add_argument("--shots", type=count(1, 100_000), default=32)
    h.add_argument("--budget", type=count(1, 100_000), default=40, help="loss evaluations")
    h.add_argument("--seed", type=SEED, default=0)
    h.add_argument("--heads-from", type=count(0, 10_000), default=0, metavar="I")
    h.add_argument("--quiet", action="store_true", help="no progress bar")
    h.set_defaults(func=cmd_lorahub)
