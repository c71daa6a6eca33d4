"""The generation endpoints, one class each over a shared base (as vLLM's `OpenAIServingCompletion`
and `OpenAIServingChat` share `OpenAIServing`). A request's whole path is `Serving.handle`, read top
to bottom:

authenticate → read (size-capped) → parse into the typed request → check the model → build the
prompt(s) as the model will see them → check them against the context length → [speculative
dispatch: send the parsed request now, hold vLLM's answer, wait until vLLM has taken it in] → the
guard's plan (classify with a deadline, audit, corrupt when flagged) → Forward: vLLM's answer to the
parsed request as is (the held one, released) | SendCorrupted: abort the held one, send
`prompt_embeds` to /v1/completions and adapt the answer to the shape asked for. Nothing of a held
answer reaches a client whose prompt was flagged: no byte, header, status, usage or error, and no
timing (the answer begins after the verdict either way).
If the client leaves before its answer begins, the work is cancelled and every request to vLLM closed.

What goes upstream is always built from the parsed request (`proxy.protocol.FIELD_RULES`), never from
the client's raw JSON. Backend errors are mapped to answers in one place, `Serving.handle`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from proxy.guard import CorruptionFailed, FlaggedRequest, Forward, RequestDecision, ResponseAdapter, SendCorrupted
from proxy.policy import ActivePolicy
from proxy.prompts import Prompt, PromptError
from proxy.protocol import ChatCompletionRequest, CompletionRequest, Endpoint, error_response, validation_message
from proxy.speculative import HoldLimits, Speculation
from proxy.tool_calls import ForcedToolCalls, tool_choice_refusal
from proxy.state import ProxyState
from proxy.translate import ChatStreamTranslator, chat_request_as_completion, completion_as_chat
from vllm_client import BackendUnavailable, UpstreamResponse, sse

MAX_JSON_DEPTH = 64  # deeper bodies are refused before anything recurses over them
COMPLETIONS_PATH = "/v1/completions"  # where every flagged request goes, as prompt_embeds
INLINE_PROMPT_BYTES = 2048  # bodies up to this size build their prompts on the event loop (under half a millisecond)
ACCEPT_BEFORE_CLASSIFY_SECONDS = 0.02  # the longest the classifier waits for vLLM to take a speculative request


class RequestRefused(Exception):
    """A client error found on the request path: answered with its status and message, never a 500."""

    def __init__(self, status: int, message: str, reason: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.reason, self.param = status, message, reason, param


class Serving:
    """One generation endpoint: its request model, its route upstream, its prompts and its flagged form."""

    endpoint: ClassVar[Endpoint]
    path: ClassVar[str]
    request_model: ClassVar[type[CompletionRequest] | type[ChatCompletionRequest]]

    def __init__(self, state: ProxyState):
        self.state = state

    async def handle(self, request: Request) -> Response:
        state = self.state
        policy = state.policy  # one policy for the whole request, even if a reload lands meanwhile
        headers = VerdictHeaders(policy, started=time.perf_counter())
        if (refused := client_auth(state, request)) is not None:
            return refused
        if not await state.embeddings_trusted():  # every request alike: a refusal must not hint at a verdict
            # pending: the backend has not answered the check since it was seen down
            reason = "unreachable" if state.embedding_check.status == "pending" else "not ready"
            return error_response(503, f"the model backend is {reason}", headers=headers.before_decision())
        try:
            raw = await read_body(state, request)  # oversized bodies are refused before they are read whole
        except RequestRefused as exc:
            state.metrics.refused.labels(exc.reason).inc()
            return error_response(exc.status, exc.message, param=exc.param, headers=headers.before_decision())
        # From here on a client that leaves cancels the work, and with it every request to vLLM.
        return await until_client_gone(request, self.answer(raw, policy, headers), state)

    async def answer(self, raw: bytes, policy: ActivePolicy, headers: VerdictHeaders) -> Response:
        state = self.state
        speculation: Speculation | None = None
        try:
            # Malformed, too deep, wrong types are refused naming the field.
            parsed = parse(raw, self.request_model)
            if parsed.model != state.served_model_name:  # the proxy serves exactly one model
                raise RequestRefused(404, f"The model `{parsed.model}` does not exist.", "unknown_model", "model")
            await self.check_supported(parsed)  # before the gate: a refusal must not depend on the verdict
            # The prompt(s) as the model will see them, refused before any classifying if they cannot fit.
            # A short body is rendered and tokenized here: a thread hop costs more than that work.
            prompts = self.prompts(parsed) if len(raw) <= INLINE_PROMPT_BYTES \
                else await run_in_threadpool(self.prompts, parsed)
            context = await check_context(state, prompts)
            if policy.dispatch == "speculative":  # validated: vLLM starts now, its answer held until the verdict,
                if state.guard.surely_flagged(policy, prompts):  # unless that answer would surely be dropped
                    state.metrics.speculation_skipped.inc()
                else:
                    speculation = Speculation(state.upstream, self.path,
                                              parsed.upstream_fields(include_classified=True),
                                              HoldLimits(policy.hold_max_bytes, policy.hold_max_tokens))
                    # The classifier waits until vLLM has taken the request in: started at once, it takes the
                    # CPU (and the GIL) that sending and vLLM's own preparing need first, and the verdict
                    # still has the whole prefill to come.
                    await speculation.accepted(ACCEPT_BEFORE_CLASSIFY_SECONDS)
            plan = await state.guard.plan(policy, self.endpoint, prompts, state.classify_timeout,
                                          lambda: self.flagged_request(parsed, prompts, context))
        except RequestRefused as exc:
            await abort(speculation, state, "refused")
            state.metrics.refused.labels(exc.reason).inc()
            return error_response(exc.status, exc.message, param=exc.param, headers=headers.before_decision())
        except BackendUnavailable as exc:
            await abort(speculation, state, "failed")
            state.metrics.backend_errors.inc()
            return error_response(503, str(exc), headers=headers.before_decision())
        except CorruptionFailed as exc:  # the flagged prompt cannot go out uncorrupted; the trace is in the log
            await abort(speculation, state, "failed")
            return error_response(500, "the proxy could not process this prompt; the request was not sent",
                                  headers=headers.after_decision(exc.decision))
        except BaseException:  # cancelled (the client left), or a bug: nothing may keep running in vLLM
            await abort(speculation, state, "client_gone")
            raise

        answer_headers = headers.after_decision(plan.decision)
        headers.timing(answer_headers, state, plan)
        if speculation is not None:
            flagged = isinstance(plan, SendCorrupted)
            record_verdict(state, speculation, flagged)
            if not flagged:
                return await released(speculation, answer_headers, state)
            # Flagged: nothing of the speculative answer is read again; it is aborted before the corrupted
            # request goes, and the client's answer is the corrupted request's alone.
            await abort(speculation, state, "flagged")
            # Counted on another thread: reading what was held must not delay (and so time) this answer.
            asyncio.get_running_loop().run_in_executor(
                None, record_waste, state, speculation, plan.decision.target_name, prompts)
        if isinstance(plan, Forward):
            path, body, adapter = self.path, parsed.upstream_fields(include_classified=True), None
        else:
            path, body, adapter = COMPLETIONS_PATH, plan.content, plan.adapter
        try:
            response = await state.upstream.open("POST", path, body)
        except BackendUnavailable as exc:
            state.metrics.backend_errors.inc()
            state.backend_lost()
            return error_response(503, str(exc), headers=answer_headers)
        if adapter is None or response.status_code != 200:  # backend errors pass through as they are
            return await relay(response, answer_headers)
        return await adapted(response, adapter, bool(parsed.stream), answer_headers)

    async def check_supported(self, parsed: Any) -> None:
        """RequestRefused for what the request asks that the backend or the flagged path cannot give."""

    def prompts(self, parsed: Any) -> list[Prompt]:
        raise NotImplementedError

    def flagged_request(self, parsed: Any, prompts: list[Prompt], context: int) -> FlaggedRequest:
        raise NotImplementedError


class CompletionServing(Serving):
    endpoint = "completions"
    path = "/v1/completions"
    request_model = CompletionRequest

    def prompts(self, parsed: CompletionRequest) -> list[Prompt]:
        return refuse_prompt_errors(lambda: self.state.builder.completion_prompts(parsed))

    def flagged_request(self, parsed: CompletionRequest, prompts: list[Prompt], context: int) -> FlaggedRequest:
        """vLLM reports zeros for the token ids of an embeddings prompt; the client asked with token ids
        or text, so it gets the real ones back, as an unflagged answer would have them."""
        body = parsed.upstream_fields(include_classified=False)
        if not parsed.return_token_ids:
            return FlaggedRequest(body, None)
        samples = parsed.n or 1

        def with_real_ids(answer: dict[str, Any]) -> dict[str, Any]:
            for choice in answer.get("choices", []):
                if choice.get("prompt_token_ids") is not None:
                    choice["prompt_token_ids"] = prompts[choice["index"] // samples].token_ids
            return answer

        return FlaggedRequest(body, ResponseAdapter(with_real_ids, lambda event: [with_real_ids(event)]))


class ChatServing(Serving):
    endpoint = "chat"
    path = "/v1/chat/completions"
    request_model = ChatCompletionRequest

    async def check_supported(self, parsed: ChatCompletionRequest) -> None:
        if not parsed.tools or parsed.tool_choice == "none":
            return
        refusal = tool_choice_refusal(parsed, await self.state.backend_tool_calls())
        if refusal is not None:
            message, param = refusal
            raise RequestRefused(400, message, "tool_choice", param)

    def prompts(self, parsed: ChatCompletionRequest) -> list[Prompt]:
        return refuse_prompt_errors(lambda: [self.state.builder.chat_prompt(parsed)])

    def flagged_request(self, parsed: ChatCompletionRequest, prompts: list[Prompt], context: int) -> FlaggedRequest:
        """A flagged chat goes to /v1/completions, rendered; its answer comes back in chat shape (a forced
        tool call held to its schema there and read back into `tool_calls`)."""
        [prompt] = prompts
        prompt_ids = prompt.token_ids if parsed.return_token_ids else None
        prompt_text = prompt.text if parsed.return_prompt_text else None
        echo = _echo_prefix(parsed)
        options = parsed.stream_options
        forced = ForcedToolCalls.of(parsed)  # its schema errors were refused in check_supported
        translator = ChatStreamTranslator(echo, prompt_ids, prompt_text,
                                          bool(options and options.continuous_usage_stats), forced,
                                          bool(parsed.return_token_ids))
        return FlaggedRequest(chat_request_as_completion(parsed, len(prompt.token_ids), context, forced),
                              ResponseAdapter(lambda body: completion_as_chat(body, echo, prompt_ids, prompt_text,
                                                                              forced),
                                              translator.translate))


class VerdictHeaders:
    """The x-eco-* headers the policy lets a client see (`headers: full | flag | none`)."""

    def __init__(self, policy: ActivePolicy, started: float):
        self.mode = policy.headers
        self.version = policy.version
        self.started = started

    def before_decision(self) -> dict[str, str]:
        return {} if self.mode == "none" else {"x-eco-policy-version": self.version}

    def after_decision(self, decision: RequestDecision) -> dict[str, str]:
        headers = self.before_decision()
        if self.mode != "none":
            headers["x-eco-flagged"] = str(decision.flagged).lower()
        if self.mode == "full":
            reported = decision.reported
            score = None if reported is None else reported.score
            # Two decimals: enough to read a decision, too coarse to steer an attack by the score.
            headers.update({"x-eco-target": decision.target_name,
                            "x-eco-score": "" if score is None else f"{score:.2f}"})
        return headers

    def timing(self, headers: dict[str, str], state: ProxyState, plan: Forward | SendCorrupted) -> None:
        """The proxy's own time before the backend request: always a histogram, a header only in full mode."""
        seconds = time.perf_counter() - self.started
        path = "flagged" if isinstance(plan, SendCorrupted) else "unflagged"
        state.metrics.added_latency.labels(path, plan.decision.target_name or "none").observe(seconds)
        if self.mode == "full":
            headers["server-timing"] = f"eco-guard;dur={1000 * seconds:.3f}"


def bearer_matches(request: Request, keys: tuple[str, ...]) -> bool:
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip().encode()
    # Compare with every key, so the time taken says nothing of which key came close.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return any(matches)


def client_auth(state: ProxyState, request: Request) -> JSONResponse | None:
    if not state.api_keys or bearer_matches(request, state.api_keys):
        return None
    state.metrics.refused.labels("unauthorized").inc()
    return error_response(401, "Incorrect or missing API key: send it as a bearer token", "AuthenticationError")


async def read_body(state: ProxyState, request: Request) -> bytes:
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


def parse(raw: bytes, model: type[CompletionRequest] | type[ChatCompletionRequest]
          ) -> CompletionRequest | ChatCompletionRequest:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestRefused(400, "the request body is not valid JSON", "malformed_json") from None
    if not isinstance(body, dict):
        raise RequestRefused(400, "the request body must be a JSON object", "malformed_json")
    if not _depth_at_most(body, MAX_JSON_DEPTH):
        raise RequestRefused(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "malformed_json")
    try:
        return model.model_validate(body)
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


def refuse_prompt_errors(build: Any) -> list[Prompt]:
    try:
        return build()
    except PromptError as exc:
        raise RequestRefused(400, str(exc), "invalid_request", str(exc).split(":", 1)[0]) from None


async def check_context(state: ProxyState, prompts: list[Prompt]) -> int:
    """A prompt that cannot fit is refused before the classifier spends time on it; the context length."""
    context = await state.context_length()
    for prompt in prompts:
        if len(prompt.token_ids) >= context:
            raise RequestRefused(
                400, f"This model's maximum context length is {context} tokens. However, your request has "
                     f"{len(prompt.token_ids)} input tokens. Please reduce the length of the input.",
                "too_long", "prompt")
    return context


def _echo_prefix(parsed: ChatCompletionRequest) -> str:
    """Chat `echo` repeats the final message when it is the assistant's own (a prefill)."""
    last = parsed.messages[-1]
    if parsed.echo and last.role == "assistant" and isinstance(last.content, str):
        return last.content
    return ""


async def until_client_gone(request: Request, work: Coroutine[Any, Any, Response], state: ProxyState) -> Response:
    """The answer `work` makes, unless the client leaves first: then `work` is cancelled (it aborts what
    it sent to vLLM on the way out). Once a response begins, Starlette watches the client itself."""
    answer = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        await asyncio.wait((answer, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not answer.done():
            answer.cancel()
            await asyncio.wait([answer])
        gone.cancel()
    if answer.cancelled():
        state.metrics.client_gone.inc()
        return Response(status_code=499)  # nobody reads it
    return answer.result()


async def _client_gone(request: Request) -> None:
    """Returns when the client has disconnected (the body is read already: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def abort(speculation: Speculation | None, state: ProxyState, reason: str) -> None:
    if speculation is not None:
        await speculation.abort()
        state.metrics.speculative_aborted.labels(reason).inc()


def record_verdict(state: ProxyState, speculation: Speculation, flagged: bool) -> None:
    """What came first, the verdict or vLLM's output, and how long that output was held."""
    metrics, first = state.metrics, speculation.first_output_at
    metrics.speculative.labels("verdict" if first is None else "output").inc()
    metrics.hold_seconds.labels("flagged" if flagged else "unflagged").observe(
        0.0 if first is None else time.perf_counter() - first)
    if speculation.limit_reached:
        metrics.hold_limit.inc()


def record_waste(state: ProxyState, speculation: Speculation, target: str, prompts: list[Prompt]) -> None:
    metrics = state.metrics
    metrics.wasted.labels(target).inc()
    metrics.wasted_prompt_tokens.labels(target).inc(sum(len(p.token_ids) for p in prompts))
    metrics.wasted_generated_tokens.labels(target).inc(speculation.generated_tokens_seen())


class ClosingStreamingResponse(StreamingResponse):
    """A stream that runs `on_close` however it ends, also when it never started (the client left)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]], **options: Any):
        super().__init__(content, **options)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


async def released(speculation: Speculation, headers: dict[str, str], state: ProxyState) -> Response:
    """Unflagged: vLLM's answer to the speculative request, exactly as vLLM sent it (held part first)."""
    try:
        response = await speculation.release()
    except BackendUnavailable as exc:
        await abort(speculation, state, "failed")
        state.metrics.backend_errors.inc()
        state.backend_lost()
        return error_response(503, str(exc), headers=headers)
    if response.is_stream:
        return ClosingStreamingResponse(_chunks_or_error(speculation.body()), speculation.abort,
                                        status_code=response.status_code, media_type=response.media_type,
                                        headers=headers)
    try:
        content = b"".join([chunk async for chunk in speculation.body()])
    except BackendUnavailable as exc:
        return error_response(503, str(exc), headers=headers)
    finally:
        await speculation.abort()
    return Response(content, status_code=response.status_code, media_type=response.media_type, headers=headers)


async def relay(response: UpstreamResponse, headers: dict[str, str]) -> Response:
    """The backend's answer as it came: a stream stays a stream, bytes stay bytes."""
    if response.is_stream:
        # Closing the stream on client disconnect closes the upstream response: vLLM aborts the request.
        return StreamingResponse(_chunks_or_error(response.raw()), status_code=response.status_code,
                                 media_type=response.media_type, headers=headers)
    try:
        content = await response.read()
    except BackendUnavailable as exc:
        return error_response(503, str(exc), headers=headers)
    return Response(content, status_code=response.status_code, media_type=response.media_type, headers=headers)


async def _chunks_or_error(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """vLLM's chunks as they come; a backend failing mid-way still ends the stream well-formed."""
    try:
        async for chunk in chunks:
            yield chunk
    except BackendUnavailable as exc:
        yield _stream_error(str(exc))


async def adapted(response: UpstreamResponse, adapter: ResponseAdapter, stream: bool,
                  headers: dict[str, str]) -> Response:
    """vLLM's answer to a corrupted request, rewritten by the adapter (a body, or each stream event)."""
    if stream:
        return StreamingResponse(_adapted_stream(response, adapter), media_type="text/event-stream",
                                 headers=headers)
    try:
        body = await response.json()
    except BackendUnavailable:
        return error_response(503, "the model backend failed mid-response", headers=headers)
    return JSONResponse(adapter.body(body), headers=headers)


async def _adapted_stream(response: UpstreamResponse, adapter: ResponseAdapter) -> AsyncIterator[bytes]:
    try:
        async for event in response.events():
            if event is None:
                yield sse.DONE
            elif "error" in event:
                yield sse.encode(event)
            else:
                for chunk in adapter.event(event):
                    yield sse.encode(chunk)
    except BackendUnavailable as exc:
        yield _stream_error(str(exc))


def _stream_error(message: str) -> bytes:
    """A stream that cannot go on still ends well-formed: an error event, then [DONE]."""
    return sse.encode({"error": {"message": message, "type": "ServiceUnavailableError", "param": None,
                                 "code": 503}}) + sse.DONE
