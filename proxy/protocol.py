"""The OpenAI request schema as the proxy reads it, and OpenAI-shaped errors.

One rule decides what reaches vLLM: every field of vLLM's own request models is in exactly one
of three sets per endpoint (`FIELD_RULES`):
- classified: content the prompt is built from, and so read by the gate;
- forwarded: parameters that shape generation but put no text before the model;
- refused: fields that would let a request skip the gate or reveal prompt likelihoods; any
  value but null (or the field's harmless default) is a 400 naming the field.
A field vLLM does not know is dropped: the upstream body is built from the parsed request,
never from the raw JSON, so vLLM cannot read anything the proxy did not place.
`tests/test_protocol.py` compares these sets with vLLM's models, so a vLLM upgrade that adds a
field fails the tests until the field is placed.

Values the proxy decides on are typed, with the coercions vLLM itself applies (pydantic's lax
mode: `"false"` is False), so the proxy never branches on the truthiness of raw JSON.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Endpoint = Literal["completions", "chat"]


@dataclass(frozen=True)
class FieldRule:
    classified: frozenset[str]
    forwarded: frozenset[str]
    refused: frozenset[str]


_SHARED_FORWARDED = frozenset({
    "model", "stream", "stream_options", "n", "max_tokens", "logprobs", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "bad_words", "allowed_token_ids", "logit_bias", "logprob_token_ids",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "length_penalty", "repetition_detection",
    "ignore_eos", "min_tokens", "include_stop_str_in_output", "skip_special_tokens", "spaces_between_special_tokens",
    "return_token_ids", "return_token_offsets", "return_tokens_as_token_ids", "response_format",
    "structured_outputs", "use_beam_search", "user", "priority", "request_id", "cache_salt", "session_id",
    "stream_interval", "thinking_token_budget", "watermarking", "add_special_tokens",
})
# Embeddings and multimodal payloads skip the tokenizer the gate reads; transfer parameters and
# extension arguments reach engine internals; truncation would make the model read other tokens
# than the ones embedded; prompt log-probabilities would reveal the uncorrupted prompt.
_SHARED_REFUSED = frozenset({
    "prompt_embeds", "mm_payload", "return_mm_kwargs", "kv_transfer_params", "ec_transfer_params", "vllm_xargs",
    "routed_experts_prompt_start", "truncate_prompt_tokens", "truncation_side", "prompt_logprobs",
})

FIELD_RULES: dict[Endpoint, FieldRule] = {
    "completions": FieldRule(
        classified=frozenset({"prompt"}),
        forwarded=_SHARED_FORWARDED,
        refused=_SHARED_REFUSED | {"echo", "suffix"},
    ),
    "chat": FieldRule(
        classified=frozenset({"messages", "tools", "documents", "chat_template_kwargs", "add_generation_prompt",
                              "continue_final_message"}),
        forwarded=_SHARED_FORWARDED | {"max_completion_tokens", "top_logprobs", "tool_choice", "parallel_tool_calls",
                                       "include_reasoning", "reasoning_effort", "echo", "return_prompt_text"},
        refused=_SHARED_REFUSED | {"chat_template", "media_io_kwargs", "mm_processor_kwargs"},
    ),
}


class _Open(BaseModel):
    """Message-level objects keep their extra keys: the chat template sees them, so the gate does too."""

    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    """A chat content part. Only `{"type": "text", "text": ...}` passes `ChatMessage`'s check: vLLM
    renders other parts (thinking, refusal, tool references, media, embeddings, and any part that
    carries a `uuid`) by paths of its own, so the classifier could not be sure to read them."""

    type: str
    text: str | None = None


class ToolCallFunction(_Open):
    name: str | None = None
    arguments: str | None = None


class ToolCall(_Open):
    function: ToolCallFunction | None = None


class ChatMessage(_Open):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning: str | None = None  # an assistant turn's reasoning, which vLLM hands to the template
    tool_call_id: str | None = None
    task: str | None = None
    tools: list[dict[str, Any]] | None = None  # a developer message's tools, also rendered

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        for index, part in enumerate(content if isinstance(content, list) else []):
            if part.type != "text":
                raise ValueError(f"content part {index} has type {part.type!r}; this proxy accepts text parts only")
            if part.text is None or part.model_extra:
                extra = sorted(part.model_extra or {})
                raise ValueError(f"content part {index} must be {{\"type\": \"text\", \"text\": ...}}"
                                 + (f", without {extra}" if extra else ""))
        return content


class ToolFunction(BaseModel):
    """A tool's function as vLLM reads it; vLLM renders only these keys, so the others are dropped here too."""

    model_config = ConfigDict(extra="ignore")

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None


class Tool(BaseModel):
    """A tool the model may be shown (and, with a tool choice, asked to call)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["function"] = "function"
    function: ToolFunction
    defer_loading: bool | None = None

    def rendered(self) -> dict[str, Any]:
        """The tool as vLLM hands it to the chat template: unset flags left out, the tool's `defer_loading`
        carried into its function unless the function sets its own."""
        function: dict[str, Any] = {"name": self.function.name, "description": self.function.description,
                                    "parameters": self.function.parameters}
        if self.function.strict is not None:
            function["strict"] = self.function.strict
        defer = self.function.defer_loading if self.function.defer_loading is not None else self.defer_loading
        if defer is not None:
            function["defer_loading"] = defer
        tool: dict[str, Any] = {"type": self.type, "function": function}
        if self.defer_loading is not None:
            tool["defer_loading"] = self.defer_loading
        return tool


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: the model must call this function."""

    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class _Request(BaseModel):
    """Fields vLLM does not know are ignored here and so never forwarded."""

    model_config = ConfigDict(extra="ignore")
    endpoint: ClassVar[Endpoint]

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    max_tokens: int | None = None
    return_token_ids: bool | None = None
    add_special_tokens: bool | None = None
    # Forwarded as the client sent them; vLLM validates them the same way on both paths.
    temperature: Any = None
    top_p: Any = None
    top_k: Any = None
    min_p: Any = None
    seed: Any = None
    stop: Any = None
    stop_token_ids: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    logit_bias: Any = None
    logprob_token_ids: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    repetition_penalty: Any = None
    length_penalty: Any = None
    repetition_detection: Any = None
    ignore_eos: Any = None
    min_tokens: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    spaces_between_special_tokens: Any = None
    return_token_offsets: Any = None
    return_tokens_as_token_ids: Any = None
    response_format: Any = None
    structured_outputs: dict[str, Any] | None = None  # an object; vLLM answers anything else with a 500
    use_beam_search: Any = None
    user: Any = None
    priority: Any = None
    request_id: Any = None
    cache_salt: Any = None
    session_id: Any = None
    stream_interval: Any = None
    thinking_token_budget: Any = None
    watermarking: Any = None
    # Refused unless null (see `_refuse`).
    prompt_embeds: Any = None
    mm_payload: Any = None
    return_mm_kwargs: Any = None
    kv_transfer_params: Any = None
    ec_transfer_params: Any = None
    vllm_xargs: Any = None
    routed_experts_prompt_start: Any = None
    truncate_prompt_tokens: Any = None
    truncation_side: Any = None
    prompt_logprobs: Any = None

    @model_validator(mode="after")
    def _refuse(self) -> "_Request":
        for name in sorted(FIELD_RULES[self.endpoint].refused):
            value = getattr(self, name, None)
            if value is not None and value is not False:
                raise ValueError(f"{name}: {_REFUSALS.get(name, 'not accepted by this endpoint')}")
        return self

    def upstream_fields(self, include_classified: bool) -> dict[str, Any]:
        """What may go to vLLM: the forwarded parameters the client set (and, unflagged, the content),
        as parsed, so a value travels in the form the proxy decided on."""
        rule = FIELD_RULES[self.endpoint]
        allowed = rule.forwarded | (rule.classified if include_classified else frozenset())
        return self.model_dump(mode="json", include=set(allowed), exclude_unset=True)


_REFUSALS = {
    "prompt_embeds": "prompt_embeds are not accepted by this endpoint; send text or token ids",
    "prompt_logprobs": "not available through this proxy",
    "echo": "not available through this proxy",
    "suffix": "not supported",
    "chat_template": "a request may not replace the chat template",
    "truncate_prompt_tokens": "prompt truncation is not available through this proxy; send a shorter prompt",
    "truncation_side": "prompt truncation is not available through this proxy; send a shorter prompt",
}


def _constraint_count(structured_outputs: dict[str, Any] | None) -> int:
    return sum((structured_outputs or {}).get(kind) is not None for kind in ("json", "regex", "choice"))


class CompletionRequest(_Request):
    endpoint: ClassVar[Endpoint] = "completions"

    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: Any = None


class ChatCompletionRequest(_Request):
    endpoint: ClassVar[Endpoint] = "chat"

    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool | None = False
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    include_reasoning: Any = None
    reasoning_effort: Any = None
    return_prompt_text: bool | None = None
    chat_template: Any = None
    media_io_kwargs: Any = None
    mm_processor_kwargs: Any = None

    @model_validator(mode="after")
    def _vllm_chat_checks(self) -> "ChatCompletionRequest":
        # vLLM's chat endpoint refuses these; the flagged path (completions) would not notice them, so the proxy
        # refuses them on every request alike.
        if self.tools == []:
            raise ValueError("tools: `tools` must not be an empty array; provide at least one tool or omit the field")
        if self.tools is None and self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice: when using `tool_choice`, `tools` must be set")
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in {tool.function.name for tool in self.tools or []}:
                raise ValueError("tool_choice: the tool specified in `tool_choice` does not match any of the "
                                 "specified `tools`")
            if _constraint_count(self.structured_outputs):
                raise ValueError("structured_outputs: you can only either use constraints for structured outputs "
                                 "or tools, not both")
        if _constraint_count(self.structured_outputs) > 1:
            # completions names the field in this error and chat does not: one message for both paths
            raise ValueError("structured_outputs: you can only use one kind of constraint ('json', 'regex' or "
                             "'choice')")
        if self.top_logprobs not in (None, 0) and not self.logprobs:
            raise ValueError("top_logprobs: when using `top_logprobs`, `logprobs` must be set to true")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                404: "NotFoundError", 405: "MethodNotAllowedError", 413: "RequestTooLargeError",
                500: "InternalServerError", 503: "ServiceUnavailableError", 504: "TimeoutError"}


def error_body(status: int, message: str, error_type: str | None = None, param: str | None = None) -> dict:
    """An error body in the shape OpenAI (and vLLM) use."""
    return {"error": {"message": message, "type": error_type or _ERROR_TYPES.get(status, "InternalServerError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, error_type: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, error_type, param), status_code=status, headers=headers)


def field_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Each problem pydantic found, as (dotted field name, message); a model-level check names its field
    first in its message ("tool_choice: ..."), and that name is taken as its field."""
    problems = []
    for error in exc.errors():
        location = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if not location and ": " in message:
            location, message = message.split(": ", 1)
        problems.append((location, message))
    return problems


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """One readable sentence naming the offending field, and that field as `param`."""
    location, message = field_errors(exc)[0]
    return (f"{location}: {message}" if location else message), (location or None)
