"""``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

The ``model`` field picks the setup: the base's id gives the base, an adapter's name
that adapter, ``NAME@VERSION`` (or ``NAME@ALIAS``) that version from the store. The
extension fields ``adapters`` (a composition) and ``merged_adapters`` (LoRAX's merge)
override it. ``n`` choices are ``n`` engine requests; with a seed, choice ``j`` uses
``seed + j``. Streams are server-sent events ending in ``[DONE]``; a client that goes
away cancels its requests (their KV blocks are free on the engine's next step)."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from ...compose import Average, Fuse, Stack, names_in
from ...errors import AdapterNameError, PolyAdapterError
from ..sampling import SamplingParams
from .errors import APIError
from .schemas import ChatCompletionRequest, CompletionRequest, Composition

router = APIRouter()
CHAT_DEFAULT_MAX_TOKENS = 256   # when a chat request gives no max_tokens (and the context allows)


# ====================================================================== models
@router.get("/v1/models")
def list_models(request: Request, authorization: str | None = Header(None)):
    server = request.app.state.server
    scope = server.settings.keys.scope(authorization)
    s, created = server.settings, int(server.started)
    limit = server.engine.max_model_len
    data = [{"id": s.model_id, "object": "model", "created": created, "owned_by": "polyadapter",
             "root": s.model_root or s.model_id, "parent": None, "max_model_len": limit}]
    for name, root in sorted(server.engine.adapters().items()):
        if root == "merge" or (scope is not None and name not in scope):
            continue
        data.append({"id": name, "object": "model", "created": created, "owned_by": "polyadapter",
                     "root": root, "parent": s.model_id, "max_model_len": limit})
    return {"object": "list", "data": data}


# ====================================================================== completions
@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, authorization: str | None = Header(None)):
    server = request.app.state.server
    scope = server.settings.keys.scope(authorization)
    if body.echo or body.suffix:
        raise APIError(400, "echo and suffix are not supported", "echo" if body.echo else "suffix")
    setup = _setup(server, body, scope)
    prompts = _prompts(body.prompt)
    params = _sampling(body, body.max_tokens, bool(body.logprobs is not None))
    return await _run(server, request, body, "text_completion", "cmpl", prompts, setup, params)


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request, authorization: str | None = Header(None)):
    server = request.app.state.server
    scope = server.settings.keys.scope(authorization)
    setup = _setup(server, body, scope)
    ids = _chat_prompt(server.engine.tokenizer, body)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:
        room = (server.engine.max_model_len or 0) - len(ids)
        max_tokens = max(1, min(CHAT_DEFAULT_MAX_TOKENS, room)) if server.engine.max_model_len else \
            CHAT_DEFAULT_MAX_TOKENS
    params = _sampling(body, max_tokens, body.logprobs)
    return await _run(server, request, body, "chat.completion", "chatcmpl", [ids], setup, params)


# ====================================================================== mapping
def _setup(server, body, scope):
    """The engine setup the request names (404 for a name the key cannot see)."""
    if body.merged_adapters is not None and body.adapters is not None:
        raise APIError(400, "give either adapters or merged_adapters, not both", "adapters")
    if body.merged_adapters is not None:
        spec = body.merged_adapters
        for name in spec.ids:
            _visible(server, name, scope, "merged_adapters.ids")
        return spec.model_dump(exclude_none=True)
    if body.adapters is not None:
        _model_setup(server, body.model, scope)  # the model field must still name something served
        return _composition(server, body.adapters, scope)
    return _model_setup(server, body.model, scope)


def _model_setup(server, model: str, scope):
    if model == server.settings.model_id:
        return None
    return _visible(server, model, scope, "model")


def _visible(server, name: str, scope, param: str) -> str:
    engine = server.engine
    if scope is not None and name not in scope:
        raise APIError(404, f"The model '{name}' does not exist.", param, "model_not_found")
    if name in server.aliases:
        return server.aliases[name]
    registered = engine.adapters()
    if name in registered and registered[name] != "merge":
        return name
    if "@" in name and engine.pool.store is not None:  # NAME@VERSION from the store, registered on first use
        alias = "v-" + name.replace("@", "-")[:60]
        try:
            engine.register_adapter(alias, f"store:{name}")
        except PolyAdapterError:
            if alias not in engine.adapters():  # else registered by a concurrent request
                raise APIError(404, f"The model '{name}' does not exist.", param, "model_not_found") from None
        server.aliases[name] = alias
        return alias
    raise APIError(404, f"The model '{name}' does not exist.", param, "model_not_found")


def _composition(server, spec: Composition, scope):
    kinds = [k for k in ("stack", "average", "fuse") if getattr(spec, k) is not None]
    if len(kinds) != 1:
        raise APIError(400, "adapters: give exactly one of stack, average or fuse", "adapters")
    kind = kinds[0]
    children = [c if not isinstance(c, str) else _visible(server, c, scope, "adapters")
                for c in getattr(spec, kind)]
    children = [_composition(server, c, scope) if isinstance(c, Composition) else c for c in children]
    try:
        if kind == "stack":
            block = Stack(*children)
        elif kind == "average":
            block = Average(*children, weights=spec.weights)
        else:
            block = Fuse(*children, fusion=spec.fusion and _visible(server, spec.fusion, scope, "adapters.fusion"))
    except PolyAdapterError as e:
        raise APIError(400, f"adapters: {e}", "adapters") from None
    for name in names_in(block):
        if name not in server.engine.adapters():
            raise APIError(404, f"The model '{name}' does not exist.", "adapters", "model_not_found")
    return block


def _prompts(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if len(prompt) > 64:
        raise APIError(400, f"prompt: {len(prompt)} prompts in one request; at most 64", "prompt")
    return [p if isinstance(p, str) else list(p) for p in prompt]


def _sampling(body, max_tokens: int, logprobs: bool) -> SamplingParams:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (give 0 or leave it out)", name)
    stop = body.stop if body.stop is not None else ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if any(not s for s in stop) or len(stop) > 16:
        raise APIError(400, "stop: up to 16 non-empty strings", "stop")
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, top_k=max(0, body.top_k or 0),
                          seed=body.seed, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
                          logprobs=logprobs, ignore_eos=body.ignore_eos)


def _chat_prompt(tokenizer, body: ChatCompletionRequest) -> list[int]:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    messages = []
    for m in body.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else \
            "".join(part.text for part in m.content)
        messages.append({"role": m.role, "content": content or ""})
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # noqa: BLE001 - a template's own refusal (roles out of order, say)
        raise APIError(400, f"messages: the chat template refused them: {e}", "messages") from None
    if hasattr(ids, "keys"):  # transformers returns a BatchEncoding in some versions
        ids = ids["input_ids"]
    return list(ids)


# ====================================================================== running
def _submit(server, prompts, setup, params: SamplingParams, n: int):
    from ...errors import ConfigError
    handles = []
    try:
        for prompt in prompts:
            for j in range(n):
                p = params if params.seed is None or j == 0 else _with_seed(params, params.seed + j)
                handles.append(server.engine.submit(prompt, setup, p))
    except ConfigError as e:
        for h in handles:
            h.cancel()
        raise APIError(400, str(e)) from None
    except AdapterNameError as e:
        for h in handles:
            h.cancel()
        raise APIError(404, str(e), "model", "model_not_found") from None
    except PolyAdapterError as e:
        for h in handles:
            h.cancel()
        raise APIError(400, str(e)) from None
    return handles


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace
    return replace(params, seed=seed % 2**63)


async def _run(server, request: Request, body, kind: str, prefix: str, prompts, setup, params):
    n = len(prompts) * body.n
    try:
        server.admission.enter(n)
    except APIError:
        server.metrics.requests.labels("rejected").inc()
        raise
    try:
        handles = _submit(server, prompts, setup, params, body.n)
    except BaseException:
        server.admission.leave(n)
        server.metrics.requests.labels("rejected").inc()
        raise
    task = asyncio.ensure_future(_settle(server, handles, n))
    server.settling.add(task)
    task.add_done_callback(server.settling.discard)
    meta = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(server, handles, kind, meta, usage, body.n),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        outputs = await _wait(request, handles)
    finally:
        _cancel(handles)
    failed = [o for o in outputs if o.finish_reason == "error"]
    if failed:  # a merge the adapters do not allow is the request's fault; an unreadable adapter is not
        raise APIError(400 if isinstance(setup, dict) else 500, f"the request failed in the engine: "
                       f"{failed[0].error}", "merged_adapters" if isinstance(setup, dict) else None)
    choices = [_choice(server, kind, i, o) for i, o in enumerate(outputs)]
    prompt_tokens = sum(o.prompt_tokens for o in outputs[::body.n])
    completion = sum(o.completion_tokens for o in outputs)
    return {**meta, "object": kind, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion}}


def _cancel(handles) -> None:
    for h in handles:
        if not h.done:
            h.cancel()


async def _settle(server, handles, n: int) -> None:
    """When every handle has finished (or been cancelled): free the admission slots and
    record the outcomes. Runs as its own task, so a response that never started
    streaming (its client gone at once) still gives its slots back."""
    try:
        outs = await asyncio.gather(*(h.aresult() for h in handles))
    finally:
        server.admission.leave(n)
    for out in outs:
        server.metrics.requests.labels(out.finish_reason).inc()
        server.metrics.observe(out)


async def _wait(request: Request, handles):
    """Every handle's output; cancels them all if the client goes away meanwhile."""
    task = asyncio.ensure_future(asyncio.gather(*(h.aresult() for h in handles)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "client disconnected")
    finally:
        if not task.done():
            task.cancel()


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, reason)


def _choice(server, kind: str, index: int, out) -> dict:
    tok = server.engine.tokenizer
    if kind == "text_completion":
        logprobs = None
        if out.logprobs:
            pieces = [tok.decode([t]) if tok is not None else str(t) for t in out.token_ids]
            offsets, at = [], 0
            for p in pieces:
                offsets.append(at)
                at += len(p)
            logprobs = {"tokens": pieces, "token_logprobs": out.logprobs,
                        "top_logprobs": [{p: lp} for p, lp in zip(pieces, out.logprobs)], "text_offset": offsets}
        return {"index": index, "text": out.text, "logprobs": logprobs, "finish_reason": _finish(out.finish_reason)}
    logprobs = None
    if out.logprobs:
        logprobs = {"content": [_token_logprob(tok, t, lp) for t, lp in zip(out.token_ids, out.logprobs)]}
    return {"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs,
            "finish_reason": _finish(out.finish_reason)}


def _token_logprob(tok, token: int, logprob: float) -> dict:
    piece = tok.decode([token]) if tok is not None else str(token)
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode()), "top_logprobs": []}


# ====================================================================== streaming
def _sse(payload) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


async def _stream(server, handles, kind: str, meta: dict, usage: bool, n: int):
    """Chunks of every choice as they come (interleaved), then usage, then [DONE]."""
    chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
    queue: asyncio.Queue = asyncio.Queue()
    tok = server.engine.tokenizer

    async def pump(i, h):
        try:
            async for ev in h:
                await queue.put((i, ev))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    try:
        if kind != "text_completion":
            for i in range(len(handles)):
                yield _sse({**meta, "object": chunk_kind, "choices": [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}]})
        open_ = len(handles)
        while open_:
            i, ev = await queue.get()
            if ev is None:
                open_ -= 1
                out = handles[i].result(timeout=0)
                if out.finish_reason == "error":
                    yield _sse({"error": {"message": f"the request failed in the engine: {out.error}",
                                          "type": "InternalServerError", "param": None, "code": 500}})
                    continue
                end = {"index": i, "finish_reason": _finish(out.finish_reason), "logprobs": None}
                end.update({"text": ""} if kind == "text_completion" else {"delta": {}})
                yield _sse({**meta, "object": chunk_kind, "choices": [end]})
                continue
            want_logprobs = handles[i].request.params.logprobs and ev.token >= 0
            if not ev.text and not want_logprobs:  # text held back (a stop string may be starting)
                continue
            choice = {"index": i, "finish_reason": None, "logprobs": None}
            if kind == "text_completion":
                choice["text"] = ev.text
                if want_logprobs:
                    piece = tok.decode([ev.token]) if tok is not None else str(ev.token)
                    choice["logprobs"] = {"tokens": [piece], "token_logprobs": [ev.logprob],
                                          "top_logprobs": [{piece: ev.logprob}], "text_offset": [0]}
            else:
                choice["delta"] = {"content": ev.text}
                if want_logprobs:
                    choice["logprobs"] = {"content": [_token_logprob(tok, ev.token, ev.logprob)]}
            yield _sse({**meta, "object": chunk_kind, "choices": [choice]})
        if usage:
            outs = [h.result(timeout=0) for h in handles]
            prompt = sum(o.prompt_tokens for o in outs[::n])
            completion = sum(o.completion_tokens for o in outs)
            yield _sse({**meta, "object": chunk_kind, "choices": [],
                        "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                  "total_tokens": prompt + completion}})
        yield b"data: [DONE]\n\n"
    finally:  # also when the client went away: cancel what still runs
        for t in tasks:
            t.cancel()
        _cancel(handles)
