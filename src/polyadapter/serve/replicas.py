"""``polyadapter serve --replicas N``: N engine replicas under Ray Serve behind one
OpenAI-compatible front (all Ray code lives here; ray is imported lazily, so the
package works without the ``cluster`` extra).

Design. Every replica (:class:`EngineReplica`, a Ray Serve deployment with
``num_replicas=N``) builds the same engine and FastAPI app as ``polyadapter serve``
(``cli.serve.build``, passed in, + ``create_app``) over the same store path, and answers a
forwarded HTTP request by calling that app in-process, so validation, keys, errors
and outputs are exactly the single server's. The front (``Front``, a FastAPI
ingress deployment behind Ray Serve's HTTP proxy) forwards each request; for
completions and chat the ``model`` field is Ray Serve's *multiplexed model id*
(the base's id maps to ``""``, no multiplexing), so requests for an adapter go to a
replica that already holds it (Ray's multiplexed routing rule, chosen by the
README's fleet simulation); ``@serve.multiplexed`` makes sure the adapter is known
to that replica. Every answer carries ``x-polyadapter-replica: PID``. A replica that
dies mid-request gives 503 (after the front's own retries on another replica), so
clients that retry lose nothing. Streaming (``stream: true``) and the admin
load/unload endpoints are not supported across replicas (400 / 501)."""

import asyncio
import os
import signal
import socket
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

REPLICA_HEADER = "x-polyadapter-replica"
FORWARDED = ("/v1/completions", "/v1/chat/completions")
NOT_SUPPORTED = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


def _require_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        from ..cli.common import CLIError
        raise CLIError("--replicas needs Ray Serve: pip install polyadapter[cluster]") from None


def _deployments(replicas: int, slots: int):
    """The two Ray Serve deployments (defined here so ray is imported only when used)."""
    import httpx
    from ray import serve
    from ray.exceptions import RayActorError, RayTaskError

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64,
                      health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    class EngineReplica:
        def __init__(self, args, build):
            import torch
            torch.set_num_threads(1)
            from .api import create_app
            self.engine, self.settings = build(args)
            self.app = create_app(self.engine, self.settings)
            self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica",
                                            timeout=None)
            self.pid = str(os.getpid())

        @serve.multiplexed(max_num_models_per_replica=slots)
        async def adapter(self, model_id: str) -> str:
            """Makes sure ``model_id`` is known here (NAME@VERSION registers from the store on
            first use in the route itself); Ray Serve keeps the ids this replica holds."""
            return model_id

        async def __call__(self, method: str, path: str, headers: dict, body: bytes):
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.adapter(model_id)
            r = await self.client.request(method, path, headers=headers, content=body)
            out = {k: v for k, v in r.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
            out[REPLICA_HEADER] = self.pid
            return r.status_code, out, r.content

        def check_health(self):
            if not self.engine.healthy:
                raise RuntimeError("the engine is not running")

        def __del__(self):
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.close()

    app = FastAPI(title="polyadapter (replicas)")

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
    @serve.ingress(app)
    class Front:
        def __init__(self, replica, base_id: str):
            self.replica, self.base_id = replica, base_id

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def forward(self, path: str, request: Request):
            path = "/" + path
            body = await request.body()
            if path in NOT_SUPPORTED:
                return JSONResponse({"error": {"message": f"{path} is not supported with --replicas",
                                               "type": "NotImplementedError", "param": None, "code": 501}},
                                    status_code=501)
            model_id = ""
            if request.method == "POST" and path in FORWARDED:
                import json
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = None
                if isinstance(payload, dict):
                    if payload.get("stream"):
                        return JSONResponse({"error": {"message": "stream is not supported with --replicas",
                                                       "type": "BadRequestError", "param": "stream", "code": 400}},
                                            status_code=400)
                    model = payload.get("model")
                    if isinstance(model, str) and model != self.base_id:
                        model_id = model
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            url = path + (("?" + request.url.query) if request.url.query else "")
            for attempt in range(3):  # a replica that died: Ray routes the retry to a live one
                try:
                    status, out, content = await self.replica.options(multiplexed_model_id=model_id).remote(
                        request.method, url, headers, body)
                    return Response(content, status_code=status, headers=out)
                except (RayActorError, RayTaskError) as e:
                    error = e
                    await asyncio.sleep(0.5 * (attempt + 1))
            return JSONResponse({"error": {"message": f"no replica answered: {type(error).__name__}",
                                           "type": "ServiceUnavailable", "param": None, "code": 503}},
                                status_code=503, headers={"Retry-After": "1"})

    return EngineReplica, Front


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(args, build) -> int:
    """Starts a local Ray instance, deploys ``args.replicas`` replicas and the front on
    ``--host``/``--port``, and serves until SIGTERM/SIGINT; then shuts Ray down.
    ``build(args) -> (engine, settings)`` is ``cli.serve.build`` (each replica calls it)."""
    _require_ray()
    import ray
    from ray import serve

    from ..cli.common import CLIError

    if args.port == 0:
        args.port = _free_port(args.host)
    else:
        try:
            with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((args.host, args.port))
        except OSError as e:
            raise CLIError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    # check the arguments (and name the base) here, before any replica starts
    engine, settings = build(args)
    n_adapters = len(engine.adapters())
    engine.close()
    spec = {k: v for k, v in vars(args).items() if k != "func"}
    import argparse
    spec = argparse.Namespace(**spec)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(address="local", num_cpus=max(2, args.replicas), include_dashboard=False,
             _node_ip_address="127.0.0.1", logging_level="ERROR", log_to_driver=args.log_level in ("info", "debug"),
             configure_logging=True)
    try:
        serve.start(http_options={"host": args.host, "port": args.port}, logging_config={"log_level": "ERROR"})
        EngineReplica, Front = _deployments(args.replicas, args.max_loaded)
        serve.run(Front.bind(EngineReplica.bind(spec, build), settings.model_id), name="polyadapter", route_prefix="/",
                  blocking=False)
        url = f"http://{args.host}:{args.port}"
        print(f"polyadapter serving {settings.model_id} and {n_adapters} adapters on {url}/v1", flush=True)
        print(f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{settings.model_id}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
