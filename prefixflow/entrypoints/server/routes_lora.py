"""LoRA adapters loaded and unloaded at run time, with vLLM's routes and bodies:
POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST /v1/unload_lora_adapter
{"lora_name"}; each answers 200 with a plain-text message, or an error body.

Both are behind the API key, as weight updates are (routes_admin.py): a server started
without --api-key refuses them (403), since anyone could otherwise make it read any folder.
The adapter is loaded (or dropped) on the engine thread between two steps, never on the
event loop; requests name it by their model as soon as this answers. A folder that cannot
load (missing, a rank above max_lora_rank, another base model's shapes) is a 400 with code
invalid_lora; unloading a name the server does not hold is a 404 with code model_not_found.
Adapters named by --lora-modules can be unloaded too.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse

from prefixflow.engine.async_engine import EngineDeadError
from prefixflow.entrypoints.server.error_response import error_response, json_object, request_error
from prefixflow.entrypoints.server.state import ServerState, ServerStateDep
from prefixflow.errors import INVALID_LORA, RequestError

router = APIRouter()


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request, server: ServerStateDep) -> Response:
    body = await _body(request, server, ("lora_name", "lora_path"))
    if isinstance(body, Response):
        return body
    name, path = body["lora_name"], body["lora_path"]
    try:
        await server.runner.add_lora(name, path)
    except EngineDeadError as e:
        return error_response(503, str(e), code="engine_failed")
    except RequestError as e:
        return request_error(e)
    except Exception as e:  # noqa: BLE001 - a folder the loader did not foresee: still the caller's
        return error_response(
            400, f"LoRA adapter {name!r} not loaded: {e}", "lora_path", INVALID_LORA
        )
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request, server: ServerStateDep) -> Response:
    body = await _body(request, server, ("lora_name",))
    if isinstance(body, Response):
        return body
    name = body["lora_name"]
    try:
        await server.runner.remove_lora(name)
    except EngineDeadError as e:
        return error_response(503, str(e), code="engine_failed")
    except RequestError as e:
        return request_error(e)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


async def _body(request: Request, server: ServerState, fields: tuple[str, ...]) -> dict | Response:
    """The body's fields, each a non-empty string, or the error to answer."""
    if server.api_key is None:
        return error_response(
            403,
            "loading and unloading LoRA adapters need the server started with --api-key",
            code="forbidden",
        )
    body = await json_object(request)
    if isinstance(body, Response):
        return body
    for f in fields:
        if not isinstance(body.get(f), str) or not body[f]:
            wanted = ", ".join(f'"{x}": ...' for x in fields)
            return error_response(400, f"give {{{wanted}}}; {f} must be a non-empty string", f)
    return body
