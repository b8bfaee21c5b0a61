"""vLLM's runtime adapter endpoints: ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter``, with vLLM's status codes (200; 400 for a duplicate
or invalid adapter; 404 for an unknown one), for every method polyadapter loads
(native and PEFT folders, ``store:REF``). Folders are accepted only under the store
and the ``--adapter-dir`` folders: the path is resolved (``..`` and symlinks
followed) before the check, so neither leads out."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Header, Request
from fastapi.responses import PlainTextResponse

from ...errors import AdapterNameError, PolyAdapterError
from .errors import APIError
from .schemas import LoadAdapterRequest, UnloadAdapterRequest

router = APIRouter()


@router.post("/v1/load_lora_adapter")
def load_adapter(body: LoadAdapterRequest, request: Request, authorization: str | None = Header(None)):
    server = request.app.state.server
    server.settings.keys.admin(authorization)
    name = body.lora_name
    if name == server.settings.model_id or name in server.engine.adapters():
        raise APIError(400, f"The lora adapter '{name}' has already been loaded.", "lora_name")
    source = allowed_source(server.settings, body.lora_path)
    try:
        server.engine.register_adapter(name, source)
    except PolyAdapterError as e:
        raise APIError(400, f"cannot load adapter '{name}' from {body.lora_path}: {e}", "lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
def unload_adapter(body: UnloadAdapterRequest, request: Request, authorization: str | None = Header(None)):
    server = request.app.state.server
    server.settings.keys.admin(authorization)
    name = body.lora_name
    if server.engine.adapters().get(name) in (None, "merge"):
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "model_not_found")
    try:
        server.engine.unregister_adapter(name)
    except AdapterNameError:
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name", "model_not_found") from None
    except PolyAdapterError as e:
        raise APIError(400, f"cannot unload adapter '{name}': {e}", "lora_name") from None
    for alias, target in list(server.aliases.items()):
        if target == name:
            del server.aliases[alias]
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def allowed_source(settings, path: str):
    """``store:REF`` (with a store), or a folder under an allowed root; 400 otherwise."""
    if path.startswith("store:"):
        if settings.store_dir is None:
            raise APIError(400, f"lora_path {path!r} names the store, but the server has none (--store)", "lora_path")
        return path
    roots = [Path(r).resolve() for r in settings.adapter_dirs]
    if settings.store_dir is not None:
        roots.append(Path(settings.store_dir).resolve())
    try:
        folder = Path(path).expanduser().resolve(strict=True)
    except (OSError, RuntimeError, ValueError):
        raise APIError(400, f"lora_path {path!r}: no such folder", "lora_path") from None
    if not any(folder == root or folder.is_relative_to(root) for root in roots):
        allowed = ", ".join(map(str, roots)) or "none (start the server with --adapter-dir DIR)"
        raise APIError(400, f"lora_path {path!r} is outside the folders adapters may load from ({allowed})",
                       "lora_path")
    return folder
