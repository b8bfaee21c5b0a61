"""``polyadapter serve --replicas N``: N engine replicas under Ray Serve behind one
OpenAI-compatible front (all Ray code lives here; ray is imported lazily, so the
package works without the ``cluster`` extra).

Design. Every replica (:class:`EngineReplica`, a Ray Serve deployment with
``num_replicas=N``) builds the same engine and FastAPI app as ``polyadapter serve``
(``cli.serve.build``, passed in, + ``create_app``) over the same store path, and answers a
forwarded HTTP request by calling that app in-process (:func:`call_app`, plain ASGI), so
validation, keys, errors, outputs and streams are exactly the single server's. The
front (``Front``, a FastAPI ingress deployment behind Ray Serve's HTTP proxy) forwards
each request; for completions and chat the ``model`` field is Ray Serve's
*multiplexed model id* (the base's id maps to ``""``, no multiplexing), so requests for
an adapter go to a replica that already holds it (Ray's multiplexed routing rule,
chosen by the README's fleet simulation). ``stream: true`` goes through a streaming
handle (``options(stream=True)``), chunk by chunk.

Runtime load/unload. The front keeps the admin requests that succeeded, in order (a
small replicated log): an admin request runs on one replica first
(its answer is the client's), and every call to a replica carries the log, which the
replica replays into its own app before it answers anything. So every replica lists
and serves the same adapters, a replica that Ray starts anew catches up, and an
unload that a replica must refuse for now (its requests still use the adapter) is
retried on its next call. The log lives in the front's memory: adapters loaded at run
time are gone when the service restarts (the store and ``--adapter`` are not).

Every answer carries ``x-polyadapter-replica: PID``. A replica that dies before it
answers is retried on another (3 tries), then 503, so clients that retry lose
nothing; a stream already under way ends where the replica died."""

import argparse
import asyncio
import json
import os
import signal
import socket
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

REPLICA_HEADER = "x-polyadapter-replica"
FORWARDED = ("/v1/completions", "/v1/chat/completions")
ADMIN = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")
DROPPED = ("content-length", "transfer-encoding", "host")


def _require_ray():
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        from ..cli.common import CLIError
        raise CLIError("--replicas needs Ray Serve: pip install polyadapter[cluster]") from None


async def call_app(app, method: str, url: str, headers: dict, body: bytes):
    """Calls the ASGI ``app`` in-process; yields ``(status, headers)``, then the body's
    chunks as the app sends them. Closing the generator early is a client disconnect
    (the app sees ``http.disconnect`` and its task is cancelled)."""
    path, _, query = url.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 0), "server": ("replica", 80)}
    sent: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    first = [True]

    async def receive():
        if first[0]:
            first[0] = False
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(None)

    task = asyncio.ensure_future(run())
    try:
        while True:
            message = await sent.get()
            if message is None:
                break
            if message["type"] == "http.response.start":
                yield message["status"], {k.decode(): v.decode() for k, v in message.get("headers", [])
                                          if k.decode().lower() not in DROPPED}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    break
        await task  # raises what the app raised
    finally:
        gone.set()
        if not task.done():
            task.cancel()


async def collect(app, method: str, url: str, headers: dict, body: bytes) -> tuple[int, dict, bytes]:
    """The whole answer of :func:`call_app`: (status, headers, body)."""
    status, out, chunks = 500, {}, []
    async for part in call_app(app, method, url, headers, body):
        if isinstance(part, tuple):
            status, out = part
        else:
            chunks.append(part)
    return status, out, b"".join(chunks)


def _deployments(replicas: int, slots: int):
    """The two Ray Serve deployments (defined here so ray is imported only when used)."""
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
            self.pid = str(os.getpid())
            self.replayed = 0  # entries of the front's admin log applied here
            self.lock = asyncio.Lock()

        @serve.multiplexed(max_num_models_per_replica=slots)
        async def adapter(self, model_id: str) -> str:
            """Makes sure ``model_id`` is known here (NAME@VERSION registers from the store on
            first use in the route itself); Ray Serve keeps the ids this replica holds."""
            return model_id

        async def _catch_up(self, log: list) -> None:
            """Replays the admin log entries this replica has not applied yet, in order; an
            entry it must refuse for now (an unload while its requests use the adapter)
            stops the replay, which resumes on the next call."""
            async with self.lock:
                while self.replayed < len(log):
                    path, headers, body = log[self.replayed]
                    status = (await collect(self.app, "POST", path, headers, body))[0]
                    if status != 200 and self._pending(path, body):
                        return
                    self.replayed += 1

        def _pending(self, path: str, body: bytes) -> bool:
            """An unload this replica refused although the adapter is still registered here."""
            if path != "/v1/unload_lora_adapter":
                return False
            try:
                name = json.loads(body).get("lora_name")
            except (ValueError, AttributeError):
                return False
            return name in self.engine.adapters()

        async def _before(self, log: list) -> None:
            """What every forwarded request waits for: the admin log replayed, and the
            request's adapter known here as a multiplexed model."""
            await self._catch_up(log)
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                await self.adapter(model_id)

        async def __call__(self, method: str, url: str, headers: dict, body: bytes, log: list):
            await self._before(log)
            status, out, content = await collect(self.app, method, url, headers, body)
            out[REPLICA_HEADER] = self.pid
            return status, out, content

        async def stream(self, method: str, url: str, headers: dict, body: bytes, log: list):
            """Like ``__call__``, but yields ``(status, headers)`` and then each chunk."""
            await self._before(log)
            async for part in call_app(self.app, method, url, headers, body):
                if isinstance(part, tuple):
                    part[1][REPLICA_HEADER] = self.pid
                yield part

        def check_health(self):
            if not self.engine.healthy:
                raise RuntimeError("the engine is not running")

        def __del__(self):
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.close()

    app = FastAPI(title="polyadapter (replicas)")
    retried = (RayActorError, RayTaskError)

    def unavailable(error) -> JSONResponse:
        return JSONResponse({"error": {"message": f"no replica answered: {type(error).__name__}",
                                       "type": "ServiceUnavailable", "param": None, "code": 503}},
                            status_code=503, headers={"Retry-After": "1"})

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=1024)
    @serve.ingress(app)
    class Front:
        def __init__(self, replica, base_id: str):
            self.replica, self.base_id = replica, base_id
            self.log: list[tuple[str, dict, bytes]] = []  # (path, headers, body) of each admin change
            self.admin_lock = asyncio.Lock()

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def forward(self, path: str, request: Request):
            path = "/" + path
            body = await request.body()
            model_id, stream = "", False
            if request.method == "POST" and path in FORWARDED + ADMIN:
                try:
                    payload = json.loads(body)
                except ValueError:
                    payload = None
                if isinstance(payload, dict):
                    stream = path in FORWARDED and payload.get("stream") is True
                    model = payload.get("lora_name") if path in ADMIN else payload.get("model")
                    if isinstance(model, str) and model != self.base_id:
                        model_id = model
            headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
            url = path + (("?" + request.url.query) if request.url.query else "")
            if path in ADMIN and request.method == "POST":
                async with self.admin_lock:  # one admin change at a time, in log order
                    response = await self._call(request.method, url, headers, body, model_id)
                    if response.status_code == 200:
                        self.log.append((path, headers, body))
                    return response
            if stream:
                return await self._stream(request.method, url, headers, body, model_id)
            return await self._call(request.method, url, headers, body, model_id)

        async def _call(self, method, url, headers, body, model_id):
            error = None
            for attempt in range(3):  # a replica that died: Ray routes the retry to a live one
                try:
                    status, out, content = await self.replica.options(multiplexed_model_id=model_id).remote(
                        method, url, headers, body, list(self.log))
                    return Response(content, status_code=status, headers=out)
                except retried as e:
                    error = e
                    await asyncio.sleep(0.5 * (attempt + 1))
            return unavailable(error)

        async def _stream(self, method, url, headers, body, model_id):
            error = None
            for attempt in range(3):  # retried only until the first part came back
                gen = self.replica.options(multiplexed_model_id=model_id, stream=True).stream.remote(
                    method, url, headers, body, list(self.log))
                try:
                    status, out = await gen.__anext__()
                except retried as e:
                    error = e
                    await asyncio.sleep(0.5 * (attempt + 1))
                    continue

                async def rest(gen=gen):
                    try:
                        async for chunk in gen:
                            yield chunk
                    except retried:
                        return  # the replica died mid-stream: the stream ends without [DONE]
                    finally:
                        gen.cancel()
                return StreamingResponse(rest(), status_code=status, headers=out)
            return unavailable(error)

    return EngineReplica, Front


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run(args, build) -> int:
    """Starts a local Ray instance (or joins ``--ray-address``), deploys ``args.replicas``
    replicas and the front on ``--host``/``--port``, and serves until SIGTERM/SIGINT;
    then removes the deployments (and shuts a local Ray down).
    ``build(args) -> (engine, settings)`` is ``cli.serve.build`` (each replica calls it)."""
    address = getattr(args, "ray_address", None)
    if not address:
        # Ray swaps 127.0.0.1 for the machine's outward address unless its cluster mode is
        # off (read when ray is imported): a local instance then stays on the loopback.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
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
    spec = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})

    if address:
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=args.log_level in ("info", "debug"))
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise CLIError(f"--ray-address {address}: cannot join the Ray cluster: {e}") from None
    else:
        ray.init(address="local", num_cpus=max(2, args.replicas), include_dashboard=False,
                 _node_ip_address="127.0.0.1", logging_level="ERROR",
                 log_to_driver=args.log_level in ("info", "debug"), configure_logging=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which sets its own handlers
        signal.signal(sig, lambda *_: stop.set())
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
            if address:
                serve.delete("polyadapter")
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
    return 0
