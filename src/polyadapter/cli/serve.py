"""``polyadapter serve``: the OpenAI-compatible HTTP server (``polyadapter.serve.api``)
over the serving engine, run with uvicorn.

    polyadapter serve                                   # packaged SmolLM2 + the default store's adapters
    polyadapter serve --model DIR --adapter fr=runs/fr --adapter-dir runs --admin-key K --port 0

``--port 0`` takes a free port; the first line printed names the URL either way."""
from __future__ import annotations

import socket
from pathlib import Path

from .common import CLIError, add_store_arg, count, number


def add_parsers(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server; the 'model' field picks the adapter",
                       description="Serve a causal LM and its adapters over OpenAI's API (completions, chat, "
                                   "models) plus vLLM's load/unload endpoints, /health and /metrics.")
    s.add_argument("--model", default="smollm2", help="smollm2 (packaged) or a local Hugging Face folder")
    s.add_argument("--served-model-name", default=None, help="the base's id in the API (default: --model's name)")
    add_store_arg(s)
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve an adapter folder (native or PEFT) or store:REF under NAME (repeatable)")
    s.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                   help="a folder load_lora_adapter may read adapters from (repeatable)")
    s.add_argument("--no-store-adapters", action="store_true",
                   help="do not serve every compatible adapter of the store by its name")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=count(0, 65535), default=8000, help="0: any free port")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="a key for inference (Bearer; repeatable); none: inference is open")
    s.add_argument("--tenant-key", action="append", default=[], metavar="KEY=NAME,NAME",
                   help="a key that may use only the base and the adapters listed (repeatable)")
    s.add_argument("--admin-key", default=None, metavar="KEY",
                   help="the key for load/unload (without it those endpoints are off)")
    s.add_argument("--max-loaded", type=count(1, 4096), default=16, help="adapters on the device at once")
    s.add_argument("--max-num-seqs", type=count(1, 4096), default=32, help="requests in the running batch")
    s.add_argument("--max-num-batched-tokens", type=count(1, 1 << 20), default=1024, help="tokens per step")
    s.add_argument("--max-queue", type=count(0, 1 << 20), default=64,
                   help="requests waiting behind a full batch before new ones get 429")
    s.add_argument("--max-lora-rank", type=count(1, 1 << 16), default=None,
                   help="refuse LoRA adapters of a higher rank (load_lora_adapter answers 400)")
    s.add_argument("--kv-cache-gb", type=number(0.01, 1024), default=1.0, help="KV cache memory")
    s.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    s.add_argument("--replicas", type=count(1, 64), default=1,
                   help="engine replicas on Ray Serve (needs polyadapter[cluster]); a local Ray instance "
                        "unless --ray-address")
    s.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="with --replicas: join this Ray cluster (e.g. HEAD_IP:6379 or auto) instead of "
                        "starting a local one")
    s.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=run)


def _pairs(values: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise CLIError(f"{flag} {v!r}: expected NAME=VALUE")
        out.append((name, rest))
    return out


def build(args, start: bool = True):
    """(engine, settings) from the parsed arguments; registers the adapters. ``start``:
    the engine runs its own loop thread (False: the caller runs it, see ``run``)."""
    import torch

    import polyadapter as pa

    from ..basemodels import load_causal_lm, load_smollm2
    from ..serve import Engine
    from ..serve.api import Keys, Settings
    from ..store import Store, default_store_path
    from ..store.store import INDEX

    adapters = _pairs(args.adapter, "--adapter")
    tenants = {key: frozenset(n for n in names.split(",") if n) for key, names in _pairs(args.tenant_key,
                                                                                         "--tenant-key")}
    for d in args.adapter_dir:
        if not Path(d).is_dir():
            raise CLIError(f"--adapter-dir {d}: no such folder")
    dtype = getattr(torch, args.dtype)
    if args.model == "smollm2":
        model, tokenizer = load_smollm2(dtype)
    else:
        model, tokenizer = load_causal_lm(args.model)
        model = model.to(dtype)
    store = None
    store_dir = Path(args.store) if args.store else default_store_path()
    if args.store or (store_dir / INDEX).is_file():  # the default store is served when there is one
        store = Store(store_dir)
    pm = pa.AdapterModel(model)
    engine = Engine(pm, tokenizer, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(
        args.max_num_batched_tokens, args.max_num_seqs), device_slots=args.max_loaded, store=store,
        max_lora_rank=args.max_lora_rank, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), start=start)
    try:
        for name, path in adapters:
            engine.register_adapter(name, path)
        if store is not None and not args.no_store_adapters:
            seen = set(engine.adapters())
            for version in store.list(compatible_with=pm):
                if version.name not in seen:
                    seen.add(version.name)
                    engine.register_adapter(version.name, f"store:{version.name}")
    except BaseException:
        engine.close()
        raise
    model_id = args.served_model_name or (args.model if args.model == "smollm2" else Path(args.model).name)
    settings = Settings(model_id=model_id, model_root=str(args.model),
                        keys=Keys(list(args.api_key), tenants, args.admin_key), max_queue=args.max_queue,
                        adapter_dirs=[Path(d) for d in args.adapter_dir],
                        store_dir=store.path if store is not None else None)
    return engine, settings


def run(args) -> int:
    if getattr(args, "replicas", 1) > 1 or getattr(args, "ray_address", None):
        from ..serve.replicas import run as run_replicas
        return run_replicas(args, build)
    import uvicorn

    from ..serve import start_in_thread
    from ..serve.api import create_app

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    sock.listen(2048)
    # The model loads in the thread that then runs the engine, so one thread does all the
    # torch work and the HTTP thread none (see serve.start_in_thread: about 1.2x on CPU).
    engine, settings = start_in_thread(lambda: build(args, start=False))
    try:
        app = create_app(engine, settings)
        port = sock.getsockname()[1]
        url = f"http://{args.host}:{port}"
        print(f"polyadapter serving {settings.model_id} and {len(engine.adapters())} adapters on {url}/v1",
              flush=True)
        auth = f" -H 'Authorization: Bearer {args.api_key[0]}'" if args.api_key else ""
        print(f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
              f"-d '{{\"model\": \"{settings.model_id}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
    return 0
