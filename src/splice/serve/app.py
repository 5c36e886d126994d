"""The OpenAI-compatible HTTP app over a `ServerState` (`build_app`).

    POST /v1/completions            text or token-id prompts (splice.serve.completions)
    POST /v1/chat/completions       messages through the tokenizer's chat template
    GET  /v1/models                 the base model and the adapters this key may use
    POST /v1/load_lora_adapter      {"lora_name", "lora_path"} (vLLM's shape; admin keys)
    POST /v1/unload_lora_adapter    {"lora_name"}
    GET  /health                    200 "ok" (no key needed)
    GET  /metrics                   Prometheus text (no key needed; splice.serve.metrics)

``model`` selects what answers: the base model's id, or an adapter name (loaded on first
use, `splice.serve.adapter_cache`). With a keys file every /v1 call needs
``Authorization: Bearer KEY`` (`splice.serve.api_keys`): 401 without a valid key, 403 for a
model the key may not use or a load / unload by a non-admin key, 429 over the key's rate.
Every error has OpenAI's body (`splice.serve.api_errors`), validation errors included (400
instead of FastAPI's 422).

The app's lifespan starts the state (the decode thread) and, at shutdown, stops it with
drain: uvicorn first waits for the in-flight HTTP requests (streams included), then the
engine finishes anything still queued.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from splice.serve.adapter_cache import AdapterBusyError
from splice.serve.adapter_sources import AdapterPathError
from splice.serve.api_errors import ApiError, error_body
from splice.serve.api_keys import KeyEntry
from splice.serve.completions import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    Completion,
    chat_prompt,
    completion_prompts,
    sampling_params,
)
from splice.serve.generation import Generation, adapter_error
from splice.serve.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from splice.serve.state import ServerState

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def authorize(state: ServerState, request: Request) -> KeyEntry | None:
    """The caller's key entry (None when the server has no keys file); 401 / 429 errors."""
    if state.keys is None:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
        )
    entry = state.keys.identify(token.strip())
    if entry is None:
        raise ApiError(401, "incorrect API key provided", code="invalid_api_key")
    wait = state.keys.take(entry)
    if wait is not None:
        raise ApiError(
            429,
            f"rate limit reached for key '{entry.name}' ({entry.rate_limit:g} requests per "
            f"minute); retry in {wait:.1f} s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(max(1, round(wait)))},
        )
    return entry


def _caller(request: Request) -> KeyEntry | None:
    return authorize(request.app.state.splice, request)


# The caller's key, as a dependency: checked before the body is validated.
Key = Annotated[KeyEntry | None, Depends(_caller)]


def _check_model(state: ServerState, key: KeyEntry | None, model: str) -> str | None:
    """The adapter ``model`` names (None: the base); 403 when the key may not use it."""
    if key is not None and not key.allows(model, state.base_id):
        raise ApiError(
            403,
            f"key '{key.name}' may not use the model '{model}'",
            code="model_not_allowed",
            param="model",
        )
    if model == state.base_id:
        return None
    if model in state.compositions:
        return model
    try:
        state.sources.check_name(model)
    except AdapterPathError as e:
        raise adapter_error(e, model) from None
    return model


def _require_admin(key: KeyEntry | None) -> None:
    if key is not None and not key.admin:
        raise ApiError(
            403, f"key '{key.name}' may not load or unload adapters (admin: true)", code="not_admin"
        )


async def _complete(
    state: ServerState, key: KeyEntry | None, body: CompletionRequest | ChatCompletionRequest
) -> Response:
    adapter = _check_model(state, key, body.model)
    chat = isinstance(body, ChatCompletionRequest)
    if chat:
        prompts = [chat_prompt(state, body)]
        params = sampling_params(state, body, prompts, None)
    else:
        prompts = completion_prompts(state, body)
        params = sampling_params(state, body, prompts, COMPLETION_DEFAULT_MAX_TOKENS)
    generation = Generation(state, body.model, adapter, prompts, params)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    completion = Completion(generation, chat=chat, include_usage=include_usage)
    try:
        await generation.start()
    except BaseException:
        await generation.close()
        raise
    if body.stream:
        return StreamingResponse(
            completion.stream(), media_type="text/event-stream", headers=SSE_HEADERS
        )
    try:
        return JSONResponse(await completion.body())
    finally:
        await generation.close()


ENDPOINTS = frozenset(
    [
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/health",
        "/metrics",
    ]
)


class _CountRequests:
    """ASGI middleware counting answered requests by endpoint and status (pure ASGI, so
    streamed answers pass through untouched)."""

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else "other"
            self.state.metrics.requests.labels(endpoint, str(status[0])).inc()


def build_app(state: ServerState, *, manage_lifecycle: bool = True) -> FastAPI:
    """The FastAPI app serving ``state``. ``manage_lifecycle``: start the state at startup
    and stop it (drained) at shutdown; a host that manages the state itself passes False."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_lifecycle:
            state.start()
        yield
        if manage_lifecycle:
            await asyncio.to_thread(state.stop, True)

    app = FastAPI(title="splice serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.splice = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        message = f"'{where}': {first['msg']}" if where else str(first["msg"])
        return JSONResponse(
            error_body(message, "invalid_request_error", where or None), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code)

    app.add_middleware(_CountRequests, state=state)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, key: Key) -> Response:
        return await _complete(state, key, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, key: Key) -> Response:
        return await _complete(state, key, body)

    @app.get("/v1/models")
    async def models(key: Key) -> JSONResponse:
        card = {"object": "model", "created": state.created, "owned_by": "splice"}
        data = [{"id": state.base_id, **card, "root": state.base_id, "parent": None}]
        names = sorted(
            set(state.sources.available()) | set(state.cache.loaded) | set(state.compositions)
        )
        for name in names:
            if key is None or key.allows(name, state.base_id):
                data.append({"id": name, **card, "root": name, "parent": state.base_id})
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest, key: Key) -> Response:
        _require_admin(key)
        _check_model(state, key, body.lora_name)
        if body.lora_name == state.base_id:
            raise ApiError(400, f"'{body.lora_name}' is the base model's id", param="lora_name")
        if body.lora_name in state.cache.loaded:
            raise ApiError(
                400,
                f"the adapter '{body.lora_name}' is already loaded; unload it first",
                param="lora_name",
            )
        try:
            path = state.sources.resolve_path(body.lora_path)
        except AdapterPathError as e:
            raise ApiError(400, str(e), code="invalid_adapter", param="lora_path") from None
        previous = state.sources.runtime.get(body.lora_name)
        state.sources.runtime[body.lora_name] = path
        try:
            await state.cache.load(body.lora_name, path)
        except Exception as e:
            if previous is None:
                state.sources.runtime.pop(body.lora_name, None)
            else:
                state.sources.runtime[body.lora_name] = previous
            raise adapter_error(e, body.lora_name) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest, key: Key) -> Response:
        _require_admin(key)
        name = body.lora_name
        _check_model(state, key, name)
        registered = state.sources.runtime.pop(name, None)
        try:
            await state.cache.unload(name)
        except KeyError:
            if registered is None:
                raise ApiError(
                    404, f"the adapter '{name}' is not loaded", code="model_not_found"
                ) from None
        except AdapterBusyError as e:
            if registered is not None:
                state.sources.runtime[name] = registered
            raise ApiError(409, str(e), code="adapter_in_use") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    return app
