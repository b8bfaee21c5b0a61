"""``polyadapter train --task causal-lm``: a LoRA on a causal language model (the packaged
SmolLM2 or a local folder), trained on chat data with the loss on the answers only, saved
to a run folder or the adapter store."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .._version import __version__
from .common import (
    METRICS_FILE,
    CLIError,
    _pct,
    _table,
    _write_json,
    check_format,
    check_max_length,
    check_out,
    fill_defaults,
)

# About 1-2 minutes on 2 CPU cores for a small chatterbot category (loading SmolLM2 included).
DEFAULTS = {"model": "smollm2", "steps": 30, "lr": 2e-3, "max_length": 160, "rank": 8}
HELP = {"epochs": "as many as --steps takes", "lr": DEFAULTS["lr"], "max_length": DEFAULTS["max_length"]}


def run_lm_training(*, model: str, data_spec: str, config: dict, out, epochs: int | None, steps: int | None,
                    lr: float, batch_size: int, max_length: int, seed: int, progress: bool,
                    format: str = "native", overwrite: bool = False, name: str = "adapter",
                    store: str | None = None) -> dict:
    """Load chat data and a causal LM, add a LoRA, train it on the answers, save. Returns a
    summary. ``epochs`` and ``steps``: passes over the data, at most ``steps`` batches
    (only ``steps``: exactly that many; neither: ``DEFAULTS["steps"]``)."""
    import torch

    from ..basemodels import load_causal_lm
    from ..causal_lm import default_targets, encode_chat, has_answer, load_chat_data
    from ..data import DataError
    from ..methods import config_from_dict
    from ..model import AdapterModel
    from ..names import check_name
    from ..training import train_lm_adapter

    start = time.perf_counter()
    cfg = config_from_dict(config, where="adapter config")  # fail fast, before any loading
    check_format(format, cfg.method)
    check_name(name, "--name")
    to_store, target = check_out(out, store, overwrite)
    data = load_chat_data(data_spec)
    net, tokenizer = load_causal_lm(model)
    check_max_length(net, max_length)
    rows = [r for r in (encode_chat(tokenizer, c, max_length) for c in data.conversations) if has_answer(r)]
    if not rows:
        raise DataError(f"{data.name}: no answer tokens are left within --max-length {max_length}")
    per_epoch = -(-len(rows) // batch_size)
    if epochs is None:
        steps = steps or DEFAULTS["steps"]
    elif steps is not None:
        steps = min(steps, epochs * per_epoch)
    if cfg.targets is None:
        cfg = cfg.replace(targets=default_targets(net))
    torch.manual_seed(seed)  # the LoRA's initialisation
    pm = AdapterModel(net)
    pm.add_adapter(name, cfg)
    counts = pm.parameter_counts(name)
    metrics = train_lm_adapter(pm, name, rows, tokenizer, epochs=epochs or 1, steps=steps, lr=lr,
                               batch_size=batch_size, max_length=max_length, seed=seed, progress=progress)
    if metrics.get("processes", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return None  # --processes N: the main process saves and reports
    record = pm.record(name)
    record.provenance.update({
        "task": "causal-lm", "base_model": str(model) if str(model) == "smollm2" else str(Path(model).resolve()),
        "data": data_spec if str(data_spec).startswith("chatterbot:") else str(Path(data_spec).resolve()),
        "loss_on": "answers", "chat_template": bool(getattr(tokenizer, "chat_template", None)),
        "conversations": len(rows),
        "metrics": {"train_loss": metrics["train_loss"], "first_loss": metrics["first_loss"]},
    })
    saved = pm.save_adapter(name, target, format=format, overwrite=overwrite, store=store)
    summary = {
        "task": "causal-lm", "adapter": f"store:{saved.ref}" if to_store else str(saved), "format": format,
        "method": cfg.method, "config": record.config.to_dict(), "sites": len(record.sites), "model": str(model),
        "model_class": type(net).__name__, "data": data.name, "conversations": len(rows), "answers": data.answers,
        "trainable_parameters": counts["adapter"], "base_parameters": counts["base"],
        "trainable_share": counts["share"], "training": metrics, "first_loss": metrics["first_loss"],
        "final_loss": metrics["train_loss"], "seconds": round(time.perf_counter() - start, 1),
        "library_version": __version__,
    }
    if not to_store:
        _write_json(Path(out) / METRICS_FILE, summary)
    return summary


def _print_summary(s: dict) -> None:
    t = s["training"]
    rows = [
        ("data", f"{s['data']}: {s['conversations']} conversations, loss on the answers"),
        ("model", f"{s['model']} ({s['model_class']})"),
        ("adapter", f"{s['method']} r={s['config'].get('r')} at {s['sites']} sites "
                    f"({', '.join(s['config'].get('targets') or [])})"),
        ("trainable parameters", (f"{s['trainable_parameters']:,} of {s['base_parameters']:,} "
                                  f"({_pct(s['trainable_share'])})")),
        ("training", f"{t['steps']} steps ({t['epochs']} epoch(s)), batch {t['batch_size']}, lr {t['lr']:g}"),
        ("loss", f"{s['first_loss']:.3f} at the first step, {s['final_loss']:.3f} at the end "
                 f"(mean of the last {min(10, t['steps'])} steps)"),
        ("time", f"{s['seconds']:.0f} s in all, {t['seconds']:.0f} s training"),
        ("saved to", s["adapter"]),
    ]
    print("\ntrain: causal-LM adapter done\n" + _table(rows), flush=True)


def cmd_train_lm(args, config: dict) -> int:
    """The train verb with ``--task causal-lm``; ``config`` from --config / --set."""
    method = args.method or config.get("method") or "lora"
    if method != "lora" or config.get("method") not in (None, "lora"):
        raise CLIError(f"--task causal-lm trains a LoRA; method {method!r} is not supported here")
    config = {**config, "method": "lora"}
    config["r"] = args.rank if args.rank is not None else config.get("r", DEFAULTS["rank"])
    if isinstance(config["r"], int) and not isinstance(config["r"], bool):  # else the config check says why
        config.setdefault("alpha", 2.0 * config["r"])
    fill_defaults(args, {k: DEFAULTS[k] for k in ("model", "lr", "max_length")})
    summary = run_lm_training(
        model=args.model, data_spec=args.data, config=config, out=args.out, epochs=args.epochs, steps=args.steps,
        lr=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
        progress=not args.quiet, format=args.format, overwrite=args.overwrite, name=args.name, store=args.store)
    if summary is None:
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0
