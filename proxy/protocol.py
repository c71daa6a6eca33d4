"""The parts of the OpenAI request schema the proxy reads, and OpenAI-shaped errors.

Models mirror the API's field names and accept unknown fields, because unflagged requests
are forwarded byte for byte and the backend owns the rest of the schema. Only what the
guard depends on is typed here, so that a wrong type is a 400 naming the field.
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class _Open(BaseModel):
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


class StreamOptions(_Open):
    include_usage: bool | None = None


class _GenerationRequest(_Open):
    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    max_tokens: int | None = None
    prompt_logprobs: int | None = None
    prompt_embeds: Any = None

    @field_validator("prompt_embeds")
    @classmethod
    def _no_client_embeddings(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("prompt_embeds are not accepted by this endpoint; send text or token ids")
        return value


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    documents: list[dict[str, Any]] | None = None
    chat_template: None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool | None = False
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None

    @field_validator("chat_template", mode="before")
    @classmethod
    def _no_client_template(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("a request may not replace the chat template")
        return None


def error_response(
    status: int,
    message: str,
    error_type: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error body in the shape OpenAI (and vLLM) use."""
    default_types = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                     503: "ServiceUnavailableError"}
    error_type = error_type or default_types.get(status, "InternalServerError")
    body = {"error": {"message": message, "type": error_type, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """One readable sentence naming the offending field, and that field as `param`."""
    first = exc.errors()[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return (f"{location}: {message}" if location else message), (location or None)


Endpoint = Literal["completions", "chat"]
