"""The HTTP face of the proxy. A request's whole path is `_generate`, read top to bottom:

read (size-capped) → parse into the typed request → check the model → build the prompt(s) as the
model will see them → check them against the context length → classify (with a deadline) →
unflagged: send the parsed request | flagged: embed, corrupt, send `prompt_embeds` to
/v1/completions and answer in the shape the client asked for.

What goes upstream is always built from the parsed request (`proxy.protocol.FIELD_RULES`), never
from the client's raw JSON.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from classifier.encoder import EncoderPool
from corruption.embedding_check import EmbeddingCheck, EmbeddingCheckResult, EmbeddingCheckUnavailable
from corruption.payload import prompt_embeds_base64, request_body_with_embeds
from proxy.guard import Decision, Guard
from proxy.observability import AuditLog, Metrics, prompt_hash
from proxy.policy import ActivePolicy, PolicyError, load_policy
from proxy.prompts import Prompt, PromptBuilder, PromptError
from proxy.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Endpoint,
    error_response,
    validation_message,
)
from proxy.translate import ChatStreamTranslator, chat_request_as_completion, completion_as_chat
from proxy.upstream import BackendUnavailable, Upstream, sse_events

log = logging.getLogger(__name__)

_PATHS: dict[Endpoint, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_REQUEST_MODELS = {"completions": CompletionRequest, "chat": ChatCompletionRequest}
MAX_JSON_DEPTH = 64  # deeper bodies are refused before anything recurses over them
BODY_BYTES_PER_TOKEN = 32  # the default body limit: generous for any text or token-id prompt that fits the context
BODY_BYTES_BASE = 64 * 1024  # plus room for tools, documents and parameters


class RequestRefused(Exception):
    """A client error found on the request path: answered with its status and message, never a 500."""

    def __init__(self, status: int, message: str, reason: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.reason, self.param = status, message, reason, param


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
    api_keys: tuple[str, ...] = ()  # client keys for /v1/*; empty: no key needed
    metrics_key: str | None = None  # bearer key for /metrics; unset: /metrics is off
    max_body_bytes: int | None = None  # None: sized from the backend's context length
    classify_timeout: float = 10.0  # seconds; a slower verdict counts as a classifier failure (fail mode)
    max_model_len: int | None = None  # asked of the backend when first needed
    # Does the backend read the proxy's embeddings as it reads text? Checked at start, after a policy
    # reload and after the backend was seen down; None: no check configured (in-process tests).
    embedding_checker: EmbeddingCheck | None = None
    embedding_check: EmbeddingCheckResult | None = None
    _reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _check_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def record_embedding_check(self, result: EmbeddingCheckResult) -> None:
        """The result where /ready reads it, and in the `eco_embedding_check` gauge."""
        self.embedding_check = result
        self.metrics.embedding_check.set(result.gauge_value)

    def backend_lost(self) -> None:
        """A restarted backend may be another vLLM: check it again before trusting it with embeddings."""
        check = self.embedding_check
        if check is not None and check.status == "passed":
            self.record_embedding_check(EmbeddingCheckResult.pending(
                self.upstream.base_url, self.guard.embeddings, self.served_model_name))

    async def embeddings_trusted(self) -> bool:
        """True when the last check passed (or was skipped on purpose); a pending check runs first."""
        check = self.embedding_check
        if check is None or check.ok:
            return True
        if check.status == "pending":
            await self.recheck_embeddings()
        return self.embedding_check is not None and self.embedding_check.ok

    async def recheck_embeddings(self) -> None:
        if self.embedding_checker is None or self.embedding_check is None or self.embedding_check.status == "skipped":
            return
        async with self._check_lock:
            try:
                result = await asyncio.to_thread(self.embedding_checker.run, self.upstream.base_url)
            except EmbeddingCheckUnavailable as exc:
                log.warning("embedding check postponed: %s", exc)
                return
            self.record_embedding_check(result)
            (log.info if result.ok else log.error)("%s", result.message)

    async def context_length(self) -> int:
        if self.max_model_len is None:
            status, body = await self.upstream.get_json("/v1/models")
            cards = body.get("data", []) if status == 200 and isinstance(body, dict) else []
            lengths = [c.get("max_model_len") for c in cards if c.get("id") == self.served_model_name]
            if not lengths or not lengths[0]:
                raise BackendUnavailable("the model backend does not report a context length")
            self.max_model_len = int(lengths[0])
        return self.max_model_len

    async def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * await self.context_length()

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
        await self.recheck_embeddings()
        return policy


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
        try:
            status, _ = await state.upstream.get_json("/v1/models")
        except (BackendUnavailable, ValueError):
            status = 0
            state.backend_lost()
        backend_ok = status == 200
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
        if not _bearer_matches(request, (state.metrics_key,)):
            return error_response(401, "invalid metrics key")
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if (refused := _client_auth(state, request)) is not None:
            return refused
        try:
            status, body = await state.upstream.get_json("/v1/models")
        except (BackendUnavailable, ValueError):
            state.metrics.backend_errors.inc()
            return error_response(503, "the model backend is unreachable")
        if status != 200 or not isinstance(body, dict):
            return error_response(503, "the model backend did not list its models")
        # The card's `root` is the backend's model path: the client needs the name only.
        cards = [{**card, "root": card["id"]} for card in body.get("data", []) if card.get("id") == state.served_model_name]
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, "chat")

    @app.post("/admin/reload")
    async def admin_reload(request: Request) -> JSONResponse:
        if not state.admin_key:
            return error_response(403, "policy reload over HTTP is disabled: no admin key is configured")
        if not _bearer_matches(request, (state.admin_key,)):
            return error_response(401, "invalid admin key")
        try:
            policy = await state.reload()
        except PolicyError as exc:
            return error_response(400, f"policy not reloaded, version {state.policy.version} stays in force: {exc}")
        return JSONResponse({"status": "reloaded", "policy_version": policy.version})

    return app


def _bearer_matches(request: Request, keys: tuple[str, ...]) -> bool:
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
    # Compare with every key, so the time taken says nothing of which key came close.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return any(matches)


def _client_auth(state: ProxyState, request: Request) -> JSONResponse | None:
    if not state.api_keys or _bearer_matches(request, state.api_keys):
        return None
    state.metrics.refused.labels("unauthorized").inc()
    return error_response(401, "Incorrect or missing API key: send it as a bearer token", "AuthenticationError")


async def _generate(state: ProxyState, request: Request, endpoint: Endpoint) -> Response:
    started = time.perf_counter()
    policy = state.policy  # one policy for the whole request, even if a reload lands meanwhile
    verdict = _VerdictHeaders(policy)
    if (refused := _client_auth(state, request)) is not None:
        return refused
    if not await state.embeddings_trusted():  # every request alike: a refusal must not hint at a verdict
        return error_response(503, "the model backend is not ready", headers=verdict.before_decision())
    try:
        # 1. Read and parse: oversized, malformed, too deep, wrong types are refused naming the field.
        parsed = _parse(await _read_body(state, request), endpoint)
        # 2. The proxy serves exactly one model.
        if parsed.model != state.served_model_name:
            raise RequestRefused(404, f"The model `{parsed.model}` does not exist.", "unknown_model", "model")
        # 3. The prompt(s) as the model will see them, refused before any classifying if they cannot fit.
        prompts = await run_in_threadpool(_build_prompts, state.builder, parsed)
        await _check_context(state, prompts)
    except RequestRefused as exc:
        state.metrics.refused.labels(exc.reason).inc()
        return error_response(exc.status, exc.message, param=exc.param, headers=verdict.before_decision())
    except BackendUnavailable as exc:
        state.metrics.backend_errors.inc()
        return error_response(503, str(exc), headers=verdict.before_decision())

    # 4. The decision for each prompt.
    decisions = await _decide(state, policy, prompts)
    deciding = _deciding_verdict(decisions)
    flagged = any(d.flagged for d in decisions)
    target_name = deciding.target.name if deciding is not None and flagged else ""
    state.metrics.requests.labels(endpoint, target_name or "none").inc()
    headers = verdict.after_decision(flagged, target_name, None if deciding is None else deciding.score)
    _audit(state, policy, endpoint, prompts, decisions, flagged)

    # 5a. Unflagged: the parsed request goes to vLLM, and vLLM's answer comes back unchanged.
    if not flagged:
        verdict.timing(headers, state, "unflagged", "none", started)
        return await _forward(state, _PATHS[endpoint], parsed.upstream_fields(include_classified=True), headers)

    # 5b. Flagged: the corrupted embeddings go to /v1/completions with the forwarded parameters only.
    state.metrics.flagged.labels(target_name).inc()
    try:
        if isinstance(parsed, ChatCompletionRequest):
            upstream_body = chat_request_as_completion(parsed, len(prompts[0].token_ids), await state.context_length())
        else:
            upstream_body = parsed.upstream_fields(include_classified=False)
    except BackendUnavailable as exc:
        state.metrics.backend_errors.inc()
        return error_response(503, str(exc), headers=headers)

    def corrupted_request() -> list[bytes]:
        payloads = [prompt_embeds_base64(state.guard.prompt_embeddings(p, d)) for p, d in zip(prompts, decisions)]
        return request_body_with_embeds(upstream_body, payloads if len(payloads) > 1 else payloads[0])

    try:
        content = await asyncio.get_running_loop().run_in_executor(state.encoders.executor, corrupted_request)
    except Exception:  # the flagged prompt cannot go out uncorrupted: refuse it, keep the trace in the log
        log.exception("corrupting a prompt flagged by %s failed", target_name)
        return error_response(500, "the proxy could not process this prompt; the request was not sent",
                              headers=headers)
    verdict.timing(headers, state, "flagged", target_name, started)
    if isinstance(parsed, ChatCompletionRequest):
        return await _forward_chat_as_completion(state, content, parsed, prompts[0], headers)
    return await _forward_flagged_completion(state, content, parsed, prompts, headers)


class _VerdictHeaders:
    """The x-eco-* headers the policy lets a client see (`headers: full | flag | none`)."""

    def __init__(self, policy: ActivePolicy):
        self.mode = policy.headers
        self.version = policy.version

    def before_decision(self) -> dict[str, str]:
        return {} if self.mode == "none" else {"x-eco-policy-version": self.version}

    def after_decision(self, flagged: bool, target: str, score: float | None) -> dict[str, str]:
        headers = self.before_decision()
        if self.mode != "none":
            headers["x-eco-flagged"] = str(flagged).lower()
        if self.mode == "full":
            # Two decimals: enough to read a decision, too coarse to steer an attack by the score.
            headers.update({"x-eco-target": target, "x-eco-score": "" if score is None else f"{score:.2f}"})
        return headers

    def timing(self, headers: dict[str, str], state: ProxyState, path: str, target: str, started: float) -> None:
        """The proxy's own time before the backend request: always a histogram, a header only in full mode."""
        seconds = time.perf_counter() - started
        state.metrics.added_latency.labels(path, target).observe(seconds)
        if self.mode == "full":
            headers["server-timing"] = f"eco-guard;dur={1000 * seconds:.3f}"


async def _read_body(state: ProxyState, request: Request) -> bytes:
    limit = await state.body_limit()
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestRefused(413, f"the request body is larger than {limit} bytes", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestRefused(413, f"the request body is larger than {limit} bytes", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes, endpoint: Endpoint) -> CompletionRequest | ChatCompletionRequest:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestRefused(400, "the request body is not valid JSON", "malformed_json") from None
    if not isinstance(body, dict):
        raise RequestRefused(400, "the request body must be a JSON object", "malformed_json")
    if not _depth_at_most(body, MAX_JSON_DEPTH):
        raise RequestRefused(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "malformed_json")
    try:
        return _REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        reason = "client_embeddings" if param in ("prompt_embeds", "chat_template") or "content part" in message \
            else "invalid_request"
        raise RequestRefused(400, message, reason, param) from None


def _depth_at_most(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return False
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return True


def _build_prompts(builder: PromptBuilder, parsed: CompletionRequest | ChatCompletionRequest) -> list[Prompt]:
    try:
        if isinstance(parsed, ChatCompletionRequest):
            return [builder.chat_prompt(parsed)]
        return builder.completion_prompts(parsed)
    except PromptError as exc:
        raise RequestRefused(400, str(exc), "invalid_request", str(exc).split(":", 1)[0]) from None


async def _check_context(state: ProxyState, prompts: list[Prompt]) -> None:
    """A prompt that cannot fit is refused before the classifier spends time on it."""
    context = await state.context_length()
    for prompt in prompts:
        if len(prompt.token_ids) >= context:
            raise RequestRefused(
                400, f"This model's maximum context length is {context} tokens. However, your request has "
                     f"{len(prompt.token_ids)} input tokens. Please reduce the length of the input.",
                "too_long", "prompt")


async def _decide(state: ProxyState, policy: ActivePolicy, prompts: list[Prompt]) -> list[Decision]:
    """Every prompt's decision; past the deadline the verdict is each target's fail mode."""
    try:
        return await asyncio.wait_for(
            run_in_threadpool(lambda: [state.guard.decide(policy, p) for p in prompts]), state.classify_timeout)
    except TimeoutError:
        log.error("classification exceeded %.1f s; applying each target's fail mode", state.classify_timeout)
        return [state.guard.failed(policy) for _ in prompts]


def _deciding_verdict(decisions: list[Decision]):
    """The verdict a request reports: the flagged one with the largest margin, else the closest to flagging."""
    flagged = [d.deciding for d in decisions if d.deciding is not None]
    pool = flagged or [d.top for d in decisions if d.top is not None]
    return max(pool, key=lambda v: v.margin) if pool else None


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


async def _open(state: ProxyState, path: str, body: list[bytes] | dict, headers: dict[str, str]
                ) -> httpx.Response | Response:
    try:
        return await state.upstream.open("POST", path, body)
    except BackendUnavailable as exc:
        state.metrics.backend_errors.inc()
        state.backend_lost()
        return error_response(503, str(exc), headers=headers)


async def _forward(state: ProxyState, path: str, body: list[bytes] | dict, headers: dict[str, str]) -> Response:
    response = await _open(state, path, body, headers)
    return response if isinstance(response, Response) else await _relay(response, headers)


async def _relay(response: httpx.Response, headers: dict[str, str]) -> Response:
    """The backend's answer as it came: a stream stays a stream, bytes stay bytes."""
    media_type = response.headers.get("content-type")
    if media_type and media_type.startswith("text/event-stream"):
        return StreamingResponse(_relay_stream(response), status_code=response.status_code,
                                 media_type=media_type, headers=headers)
    content = await _read_all(response)
    if content is None:
        return error_response(503, "the model backend failed mid-response", headers=headers)
    return Response(content, status_code=response.status_code, media_type=media_type, headers=headers)


async def _read_all(response: httpx.Response) -> bytes | None:
    try:
        return await response.aread()
    except httpx.HTTPError:
        return None
    finally:
        await response.aclose()


async def _relay_stream(response: httpx.Response) -> AsyncIterator[bytes]:
    # Closing the upstream response on client disconnect (generator closed) aborts the request in vLLM.
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    except httpx.HTTPError:
        yield _stream_error("the model backend failed mid-stream")
    finally:
        await response.aclose()


async def _forward_flagged_completion(state: ProxyState, content: list[bytes], parsed: CompletionRequest,
                                      prompts: list[Prompt], headers: dict[str, str]) -> Response:
    """vLLM reports zeros for the token ids of an embeddings prompt; the client asked with token ids
    or text, so it gets the real ones back, as an unflagged answer would have them."""
    if not parsed.return_token_ids:
        return await _forward(state, "/v1/completions", content, headers)
    samples = parsed.n or 1

    def with_real_ids(body: dict[str, Any]) -> dict[str, Any]:
        for choice in body.get("choices", []):
            if choice.get("prompt_token_ids") is not None:
                choice["prompt_token_ids"] = prompts[choice["index"] // samples].token_ids
        return body

    return await _forward_rewritten(state, content, bool(parsed.stream), headers, with_real_ids,
                                    lambda event: [with_real_ids(event)])


async def _forward_chat_as_completion(state: ProxyState, content: list[bytes], parsed: ChatCompletionRequest,
                                      prompt: Prompt, headers: dict[str, str]) -> Response:
    prompt_ids = prompt.token_ids if parsed.return_token_ids else None
    prompt_text = prompt.text if parsed.return_prompt_text else None
    echo = _echo_prefix(parsed)
    options = parsed.stream_options
    translator = ChatStreamTranslator(echo, prompt_ids, prompt_text,
                                      bool(options and options.continuous_usage_stats))
    return await _forward_rewritten(state, content, bool(parsed.stream), headers,
                                    lambda body: completion_as_chat(body, echo, prompt_ids, prompt_text),
                                    translator.translate)


async def _forward_rewritten(state: ProxyState, content: list[bytes], stream: bool, headers: dict[str, str],
                             rewrite_body: Callable[[dict], dict],
                             rewrite_event: Callable[[dict], list[dict]]) -> Response:
    """Send a flagged request and rewrite vLLM's answer (a body, or each stream event). Backend errors
    (4xx/5xx) pass through as they are, in the shape they would have had unflagged."""
    response = await _open(state, "/v1/completions", content, headers)
    if isinstance(response, Response):
        return response
    if response.status_code != 200:
        return await _relay(response, headers)
    if stream:
        return StreamingResponse(_rewritten_stream(response, rewrite_event), media_type="text/event-stream",
                                 headers=headers)
    raw = await _read_all(response)
    if raw is None:
        return error_response(503, "the model backend failed mid-response", headers=headers)
    return JSONResponse(rewrite_body(json.loads(raw)), headers=headers)


async def _rewritten_stream(response: httpx.Response, rewrite: Callable[[dict], list[dict]]) -> AsyncIterator[bytes]:
    try:
        async for event in sse_events(response):
            if event is None:
                yield b"data: [DONE]\n\n"
            elif "error" in event:
                yield _sse(event)
            else:
                for chunk in rewrite(event):
                    yield _sse(chunk)
    except httpx.HTTPError:
        yield _stream_error("the model backend failed mid-stream")
    finally:
        await response.aclose()


def _echo_prefix(parsed: ChatCompletionRequest) -> str:
    """Chat `echo` repeats the final message when it is the assistant's own (a prefill)."""
    last = parsed.messages[-1]
    if parsed.echo and last.role == "assistant" and isinstance(last.content, str):
        return last.content
    return ""


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _stream_error(message: str) -> bytes:
    """A stream that cannot go on still ends well-formed: an error event, then [DONE]."""
    return _sse({"error": {"message": message, "type": "ServiceUnavailableError", "param": None,
                           "code": 503}}) + b"data: [DONE]\n\n"
