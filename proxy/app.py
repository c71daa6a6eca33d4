"""The HTTP face of the proxy: the routes, a few lines each. A generation request's whole path is
`proxy.serving.Serving.handle`; the state it needs is `proxy.state.ProxyState`."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from proxy.policy import PolicyError
from proxy.protocol import error_response
from proxy.serving import ChatServing, CompletionServing, bearer_matches, client_auth
from proxy.state import ProxyState
from vllm_client import BackendRefused, BackendUnavailable

__all__ = ["ProxyState", "create_app"]

log = logging.getLogger(__name__)


def create_app(state: ProxyState, lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="eco-proxy", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.router.redirect_slashes = False
    app.state.proxy = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "no such route", 405: f"method {request.method} is not allowed here"}
        return error_response(exc.status_code, messages.get(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "the proxy failed on this request")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        backend_ok = await state.upstream.is_ready()
        if not backend_ok:
            state.backend_lost()
        body: dict[str, Any] = {"backend": "ok" if backend_ok else "unreachable",
                                "policy_version": state.policy.version}
        check_ok = True
        if state.embedding_check is not None:
            if backend_ok and state.embedding_check.status == "pending":
                await state.recheck_embeddings()
            body["embedding_check"] = state.embedding_check.status
            check_ok = state.embedding_check.ok
        return JSONResponse(body, status_code=200 if backend_ok and check_ok else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not state.metrics_key:
            return error_response(404, "no such route")
        if not bearer_matches(request, (state.metrics_key,)):
            return error_response(401, "invalid metrics key")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if (refused := client_auth(state, request)) is not None:
            return refused
        try:
            cards = await state.upstream.models()
        except BackendUnavailable:
            state.metrics.backend_errors.inc()
            return error_response(503, "the model backend is unreachable")
        except BackendRefused:
            return error_response(503, "the model backend did not list its models")
        # The card's `root` is the backend's model path: the client needs the name only.
        return JSONResponse({"object": "list", "data": [
            {**card, "root": card["id"]} for card in cards if card.get("id") == state.served_model_name]})

    # Plain Starlette routes: `handle` takes the request as it is, so FastAPI's per-request dependency
    # solving would be spent on nothing, on the path whose every fraction of a millisecond counts.
    for serving in (CompletionServing(state), ChatServing(state)):
        app.add_route(serving.path, serving.handle, methods=["POST"])

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> JSONResponse:
        if not state.admin_key:
            return error_response(403, "policy reload over HTTP is disabled: no admin key is configured")
        if not bearer_matches(request, (state.admin_key,)):
            return error_response(401, "invalid admin key")
        try:
            policy = await state.reload()
        except PolicyError as exc:
            return error_response(400, f"policy not reloaded, version {state.policy.version} stays in force: {exc}")
        return JSONResponse({"status": "reloaded", "policy_version": policy.version})

    return app
