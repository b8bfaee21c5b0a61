"""The ``polyadapter`` command line: the parser and ``main``; one module per verb group.

    polyadapter quickstart                       # LoRA on MiniLM, BBC News, in a few minutes
    polyadapter train --data bbc --method lora --out runs/bbc-lora      (cli/train.py: quickstart, train, eval)
    polyadapter train --task causal-lm --model smollm2 --data chatterbot:greetings --out store:greetings
                                                                       (cli/train_lm.py)
    polyadapter info runs/bbc-lora                                     (cli/describe.py: info, convert, methods)
    polyadapter combine runs/a runs/b --method ties --out ab           (cli/reuse.py: combine, compress, merge, lorahub)
    polyadapter store add runs/bbc-lora --name bbc                     (cli/store.py: the adapter store)
    polyadapter serve --port 8000                                      (cli/serve.py: the OpenAI-compatible server)

Every deliberate error (``PolyAdapterError``) and every file-system error (``OSError``)
ends the command with a one-line message on stderr and exit code 2, without a traceback.
"""
from __future__ import annotations

# argparse, not click/typer: it ships with Python, so the CLI adds no dependency and
# sub-commands, help and usage errors (exit code 2) come for free.
import argparse
import sys
import warnings

from .._version import __version__
from ..errors import PolyAdapterError
from . import describe, reuse, serve, store, train
from .common import CLIError  # noqa: F401  (re-exported: the CLI's own error type)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polyadapter", description="Adapters on any frozen PyTorch model: train, evaluate, inspect, convert, "
                                        "combine, store.")
    parser.add_argument("--version", action="version", version=f"polyadapter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (train, describe, reuse, store, serve):
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]  # to re-launch (train --processes)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _run(args)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"polyadapter: warning: {message}", file=sys.stderr if file is None else file)


def _run(args) -> int:
    try:
        return args.func(args)
    except PolyAdapterError as e:
        return _fail(args, " ".join(str(e).split()) or type(e).__name__)
    except OSError as e:  # a file-system error the checks could not foresee (disk full, a race)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        return _fail(args, f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print(f"polyadapter {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(args, message: str) -> int:
    print(f"polyadapter {args.command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
