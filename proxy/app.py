"""The HTTP face of the proxy. A request's whole path is `_generate`, read top to bottom:

parse → check the model → build the prompt(s) as the model will see them → classify →
unflagged: forward the request as read | flagged: embed, corrupt, send `prompt_embeds`
to /v1/completions and answer in the shape the client asked for.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from classifier.encoder import EncoderPool
from corruption.payload import prompt_embeds_base64, request_body_with_embeds
from proxy.guard import Decision, Guard
from proxy.observability import AuditLog, Metrics, prompt_hash
from proxy.policy import ActivePolicy, PolicyError, load_policy
from proxy.prompts import Prompt, PromptBuilder
from proxy.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Endpoint,
    error_response,
    validation_message,
)
from proxy.translate import ChatStreamTranslator, chat_body_as_completion, completion_as_chat
from proxy.upstream import BackendUnavailable, Upstream, sse_events

log = logging.getLogger(__name__)

_PATHS: dict[Endpoint, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_REQUEST_MODELS = {"completions": CompletionRequest, "chat": ChatCompletionRequest}


@dataclass
class ProxyState:
    """Everything a request needs; the policy is swapped whole on reload."""

    policy: ActivePolicy
    policy_path: str
    served_model_name: str
    builder: PromptBuilder
    guard: Guard
    upstream: Upstream
    metrics: Metrics
    audit: AuditLog
    encoders: EncoderPool  # kept across reloads; its executor is the one thread for all torch work
    admin_key: str | None = None
    max_model_len: int | None = None  # asked of the backend when first needed
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def context_length(self) -> int:
        if self.max_model_len is None:
            status, body = await self.upstream.get_json("/v1/models")
            cards = body.get("data", []) if status == 200 else []
            lengths = [c.get("max_model_len") for c in cards if c.get("id") == self.served_model_name]
            if not lengths or not lengths[0]:
                raise BackendUnavailable(f"the backend does not report a context length for {self.served_model_name}")
            self.max_model_len = int(lengths[0])
        return self.max_model_len

    async def reload(self) -> ActivePolicy:
        """Load the policy file again; on any error the running policy stays in force."""
        async with self._reload_lock:
            try:
                policy = await run_in_threadpool(load_policy, self.policy_path, self.encoders,
                                                  self.guard.embeddings.hidden_size)
            except PolicyError:
                self.metrics.reloads.labels("rejected").inc()
                raise
            self.policy = policy
            self.metrics.reloads.labels("applied").inc()
            log.info("policy %s loaded from %s", policy.version, policy.source)
            return policy


def create_app(state: ProxyState, lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="eco-proxy", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.proxy = state

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        try:
            status, _ = await state.upstream.get_json("/v1/models")
        except (BackendUnavailable, ValueError):
            status = 0
        ok = status == 200
        body = {"backend": "ok" if ok else "unreachable", "policy_version": state.policy.version}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        try:
            response = await state.upstream.open("GET", "/v1/models")
        except BackendUnavailable as exc:
            state.metrics.backend_errors.inc()
            return error_response(503, str(exc))
        return await _relay(response, {})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, "chat")

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> JSONResponse:
        if not state.admin_key:
            return error_response(403, "policy reload over HTTP is disabled: no admin key is configured",
                                  "PermissionDeniedError")
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), state.admin_key.encode()):
            return error_response(401, "invalid admin key")
        try:
            policy = await state.reload()
        except PolicyError as exc:
            return error_response(400, f"policy not reloaded, version {state.policy.version} stays in force: {exc}")
        return JSONResponse({"status": "reloaded", "policy_version": policy.version})

    return app


async def _generate(state: ProxyState, request: Request, endpoint: Endpoint) -> Response:
    started = time.perf_counter()
    policy = state.policy  # one policy for the whole request, even if a reload lands meanwhile
    headers = {"x-eco-policy-version": policy.version, "x-eco-flagged": "false", "x-eco-target": "",
               "x-eco-score": ""}

    # 1. Parse: malformed JSON and wrong types are a 400 naming the field.
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        state.metrics.refused.labels("malformed_json").inc()
        return error_response(400, "the request body is not valid JSON", headers=headers)
    if not isinstance(body, dict):
        state.metrics.refused.labels("malformed_json").inc()
        return error_response(400, "the request body must be a JSON object", headers=headers)
    try:
        parsed = _REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        reason = "client_embeddings" if "embeds" in message or "chat template" in message else "invalid_request"
        state.metrics.refused.labels(reason).inc()
        return error_response(400, message, param=param, headers=headers)

    # 2. The proxy serves exactly one model.
    if parsed.model != state.served_model_name:
        return error_response(404, f"The model `{parsed.model}` does not exist.", "NotFoundError", "model",
                              headers=headers)

    # 3. The prompt(s) as the model will see them, and the decision for each.
    try:
        prompts = await run_in_threadpool(_build_prompts, state.builder, parsed, endpoint)
    except (ValueError, TypeError) as exc:  # e.g. a template error on odd roles, ids out of range
        state.metrics.refused.labels("invalid_request").inc()
        return error_response(400, f"cannot build the prompt: {exc}", headers=headers)
    decisions = await run_in_threadpool(lambda: [state.guard.decide(policy, p) for p in prompts])
    report = _report(decisions)
    target_name = report.target.name if report else ""
    state.metrics.requests.labels(endpoint, target_name or "none").inc()
    flagged = any(d.flagged for d in decisions)
    headers.update({"x-eco-flagged": str(flagged).lower(), "x-eco-target": target_name if flagged else "",
                    "x-eco-score": "" if report is None or report.score is None else f"{report.score:.4f}"})
    _audit(state, policy, endpoint, prompts, decisions, flagged)

    # 4a. Unflagged: the request as the proxy read it goes to vLLM (re-serialised, so vLLM cannot parse
    #     the bytes differently from the proxy), and vLLM's answer comes back unchanged.
    if not flagged:
        _record_added_latency(state, headers, "unflagged", "none", started)
        return await _forward(state, _PATHS[endpoint], body, headers)

    # 4b. Flagged: nothing may reveal the uncorrupted prompt's likelihoods.
    state.metrics.flagged.labels(target_name).inc()
    if body.get("echo") or body.get("prompt_logprobs") is not None:
        return error_response(400, "echo and prompt_logprobs are not available for this prompt",
                              param="echo" if body.get("echo") else "prompt_logprobs", headers=headers)
    if endpoint == "completions":
        upstream_body = {k: v for k, v in body.items() if k != "prompt"}
    else:
        try:
            context_length = await state.context_length()
        except BackendUnavailable as exc:
            state.metrics.backend_errors.inc()
            return error_response(503, str(exc), headers=headers)
        upstream_body = chat_body_as_completion(body, len(prompts[0].token_ids), context_length)

    def corrupted_request() -> list[bytes]:
        payloads = [prompt_embeds_base64(state.guard.prompt_embeddings(p, d)) for p, d in zip(prompts, decisions)]
        return request_body_with_embeds(upstream_body, payloads if len(payloads) > 1 else payloads[0])

    try:
        content = await asyncio.get_running_loop().run_in_executor(state.encoders.executor, corrupted_request)
    except Exception:  # the flagged prompt cannot go out uncorrupted: refuse it, say so, keep the trace in the log
        log.exception("corrupting a prompt flagged by %s failed", target_name)
        return error_response(500, "the proxy could not corrupt this prompt; the request was not sent",
                              "InternalServerError", headers=headers)
    _record_added_latency(state, headers, "flagged", target_name, started)
    if endpoint == "completions":
        return await _forward(state, "/v1/completions", content, headers)
    return await _forward_chat_as_completion(state, content, bool(upstream_body.get("stream")),
                                             _echo_prefix(parsed), headers)


def _record_added_latency(state: ProxyState, headers: dict[str, str], path: str, target: str, started: float) -> None:
    """The proxy's own time before the backend request: a histogram, and a Server-Timing header."""
    seconds = time.perf_counter() - started
    state.metrics.added_latency.labels(path, target).observe(seconds)
    headers["server-timing"] = f"eco-guard;dur={1000 * seconds:.3f}"


def _build_prompts(builder: PromptBuilder, parsed: Any, endpoint: Endpoint) -> list[Prompt]:
    return builder.completion_prompts(parsed) if endpoint == "completions" else [builder.chat_prompt(parsed)]


def _report(decisions: list[Decision]):
    verdicts = [d.top for d in decisions if d.top is not None]
    flagged = [d.deciding for d in decisions if d.deciding is not None]
    pool = flagged or verdicts
    return max(pool, key=lambda v: v.margin) if pool else None


def _echo_prefix(parsed: Any) -> str:
    """Chat `echo` repeats the final message when it is the assistant's own (a prefill)."""
    last = parsed.messages[-1]
    if parsed.echo and last.role == "assistant" and isinstance(last.content, str):
        return last.content
    return ""


def _audit(state: ProxyState, policy: ActivePolicy, endpoint: Endpoint, prompts: list[Prompt],
           decisions: list[Decision], flagged: bool) -> None:
    for prompt, decision in zip(prompts, decisions):
        deciding = decision.deciding
        top = decision.top
        record: dict[str, Any] = {
            "request": uuid.uuid4().hex,
            "endpoint": endpoint,
            "flagged": decision.flagged,
            "request_flagged": flagged,
            "target": deciding.target.name if deciding else None,
            "score": None if top is None else top.score,
            "threshold": None if top is None else top.target.threshold,
            "scores": {v.target.name: v.score for v in decision.verdicts},
            "corruption": deciding.target.corruption.model_dump() if deciding else None,
            "policy_version": policy.version,
            "prompt_sha256": prompt_hash(prompt.text),
            "prompt_tokens": len(prompt.token_ids),
        }
        if policy.audit_include_text:
            record["prompt"] = prompt.text
        state.audit.write(record)


async def _forward(state: ProxyState, path: str, body: list[bytes] | dict, headers: dict[str, str]) -> Response:
    try:
        response = await state.upstream.open("POST", path, body)
    except BackendUnavailable as exc:
        state.metrics.backend_errors.inc()
        return error_response(503, str(exc), headers=headers)
    return await _relay(response, headers)


async def _relay(response: httpx.Response, headers: dict[str, str]) -> Response:
    """The backend's answer as it came: a stream stays a stream, bytes stay bytes."""
    media_type = response.headers.get("content-type")
    if media_type and media_type.startswith("text/event-stream"):
        return StreamingResponse(_relay_stream(response), status_code=response.status_code,
                                 media_type=media_type, headers=headers)
    try:
        content = await response.aread()
    except httpx.HTTPError as exc:
        return error_response(503, f"the model backend failed mid-response ({type(exc).__name__})", headers=headers)
    finally:
        await response.aclose()
    return Response(content, status_code=response.status_code, media_type=media_type, headers=headers)


async def _relay_stream(response: httpx.Response) -> AsyncIterator[bytes]:
    # Closing the upstream response on client disconnect (generator closed) aborts the request in vLLM.
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        yield _stream_error(f"the model backend failed mid-stream ({type(exc).__name__})")
    finally:
        await response.aclose()


async def _forward_chat_as_completion(state: ProxyState, content: list[bytes], stream: bool, echo_prefix: str,
                                      headers: dict[str, str]) -> Response:
    try:
        response = await state.upstream.open("POST", "/v1/completions", content)
    except BackendUnavailable as exc:
        state.metrics.backend_errors.inc()
        return error_response(503, str(exc), headers=headers)
    if response.status_code != 200:  # backend 4xx/5xx bodies pass through as they are
        return await _relay(response, headers)
    if stream:
        return StreamingResponse(_chat_stream(response, echo_prefix), media_type="text/event-stream",
                                 headers=headers)
    try:
        await response.aread()
    except httpx.HTTPError as exc:
        return error_response(503, f"the model backend failed mid-response ({type(exc).__name__})", headers=headers)
    finally:
        await response.aclose()
    return JSONResponse(completion_as_chat(response.json(), echo_prefix), headers=headers)


async def _chat_stream(response: httpx.Response, echo_prefix: str) -> AsyncIterator[bytes]:
    translator = ChatStreamTranslator(echo_prefix)
    try:
        async for event in sse_events(response):
            if event is None:
                yield b"data: [DONE]\n\n"
            elif "error" in event:
                yield _sse(event)
            else:
                for chunk in translator.translate(event):
                    yield _sse(chunk)
    except httpx.HTTPError as exc:
        yield _stream_error(f"the model backend failed mid-stream ({type(exc).__name__})")
    finally:
        await response.aclose()


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _stream_error(message: str) -> bytes:
    """A stream that cannot go on still ends well-formed: an error event, then [DONE]."""
    return _sse({"error": {"message": message, "type": "ServiceUnavailableError", "param": None,
                           "code": 503}}) + b"data: [DONE]\n\n"
