"""What the model will see: the text to classify and the token ids to embed.

For chat, the conversation is rendered with the model's own chat template exactly as
vLLM renders it, so the classifier sees every message (system, earlier turns, tool
results, tool-call arguments) and a flagged prompt is embedded token for token as the
model would have read it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from classifier.gate_data import chat_transcript
from proxy.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


@dataclass(frozen=True)
class Prompt:
    """One prompt as the model sees it."""

    text: str  # the decoded/rendered prompt
    token_ids: list[int]
    offsets: list[tuple[int, int]]  # each token's character span in `text`, for entity scope
    segments: tuple[str, ...]  # what the classifier reads: the whole prompt and each message, or what stands for it


class PromptError(ValueError):
    """The request's prompt cannot be built (token ids out of the vocabulary, a template that refuses the
    conversation); the message is safe to show the client."""


class PromptBuilder:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def completion_prompts(self, request: CompletionRequest) -> list[Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            items: list[str | list[int]] = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [raw]  # one prompt given as token ids
        else:
            items = list(raw)
        # As vLLM does for completions: special tokens (<bos>) added unless the request says otherwise.
        add_special_tokens = request.add_special_tokens is not False
        constraints = _constraint_texts(request)
        return [self._completion_prompt(item, add_special_tokens, constraints) for item in items]

    def _completion_prompt(self, item: str | list[int], add_special_tokens: bool, constraints: list[str]) -> Prompt:
        if isinstance(item, str):
            encoded = self.tokenizer(item, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            return Prompt(item, encoded.input_ids, encoded.offset_mapping, (item, *constraints))
        # Token ids are decoded and classified like text; never forwarded unread.
        for position, token in enumerate(item):
            if not 0 <= token < self.vocab_size:
                raise PromptError(f"prompt: token id {token} at position {position} is outside the vocabulary "
                                  f"(0 to {self.vocab_size - 1})")
        pieces = [self.tokenizer.decode([i], skip_special_tokens=True) for i in item]
        offsets, position = [], 0
        for piece in pieces:
            offsets.append((position, position + len(piece)))
            position += len(piece)
        text = "".join(pieces)
        decoded = self.tokenizer.decode(item, skip_special_tokens=True)
        return Prompt(text, list(item), offsets, tuple(dict.fromkeys((text, decoded, *constraints))))

    def chat_prompt(self, request: ChatCompletionRequest) -> Prompt:
        messages = [_template_message(m) for m in request.messages]
        try:
            rendered = self._render(request, messages)
        except Exception as exc:  # jinja raises its own types for conversations a template refuses
            raise PromptError(f"messages: the chat template cannot render this conversation ({type(exc).__name__})") from exc
        # vLLM tokenizes a rendered chat without adding special tokens (the template has them) unless asked to.
        encoded = self.tokenizer(rendered, add_special_tokens=request.add_special_tokens is True,
                                 return_offsets_mapping=True)
        contents = [m["content"] for m in messages if m["content"]]
        segments = contents + _field_texts(request) + _constraint_texts(request)
        # The conversation is also read as a whole, as the gate was trained to read chats (a target split
        # across messages, a question that only an earlier turn explains), and the rendering itself when the
        # template put more than the message contents into it (names, ids, tools, template arguments).
        if len(contents) > 1:
            segments.insert(0, chat_transcript({"role": m["role"], "content": m["content"]}
                                               for m in messages if m["content"]))
        if not self._only_wraps(request, messages, rendered):
            segments.insert(0, rendered)
        return Prompt(rendered, encoded.input_ids, encoded.offset_mapping, tuple(segments))

    def _render(self, request: ChatCompletionRequest, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=_template_tools(request),
            documents=request.documents,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tokenize=False,
            **(request.chat_template_kwargs or {}),
        )

    def _only_wraps(self, request: ChatCompletionRequest, messages: list[dict[str, Any]], rendered: str) -> bool:
        """Whether `rendered` holds nothing a client wrote but the message contents: it must equal the
        rendering of the bare conversation (roles only; no names, ids, tools or template arguments)
        with the contents put back in."""
        if _field_texts(request) or request.chat_template_kwargs:
            return False
        markers = [f"\ue000eco-proxy-content-{i}\ue000" for i in range(len(messages))]
        bare = [{"role": m["role"], "content": marker if m["content"] else ""} for m, marker in zip(messages, markers)]
        try:
            skeleton = self.tokenizer.apply_chat_template(
                bare, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message, tokenize=False)
        except Exception:  # a template that needs more than roles and contents: classify the whole rendering
            return False
        for message, marker in zip(messages, markers):
            if message["content"]:
                if skeleton.count(marker) != 1:
                    return False
                skeleton = skeleton.replace(marker, message["content"])
        return skeleton == rendered


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """The message as vLLM hands it to the template: text parts joined by newlines, and an
    assistant's reasoning also under its older name."""
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text or "" for part in content)
    rendered: dict[str, Any] = message.model_dump(exclude_none=True)
    rendered["content"] = content or ""
    if message.role == "assistant" and message.reasoning is not None:
        rendered["reasoning_content"] = message.reasoning
    return rendered


def _template_tools(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    return None if request.tools is None else [tool.rendered() for tool in request.tools]


def _constraint_texts(request: CompletionRequest | ChatCompletionRequest) -> list[str]:
    """The text of a structured-output constraint (each choice, a regex, a grammar, a JSON schema): what
    the answer is made to say. The model never reads it as prompt, but a forced answer that names the
    target ("Harry Potter's godfather is ...") asks about it as surely as a prompt does."""
    texts: list[str] = []
    constraints: dict[str, Any] = dict(request.structured_outputs or {})
    if isinstance(request.response_format, dict):
        constraints.update({f"response_format.{key}": value for key, value in request.response_format.items()
                            if key != "type"})
    for key, value in constraints.items():
        if key == "choice" and isinstance(value, list):
            texts += [choice for choice in value if isinstance(choice, str) and choice]
        elif isinstance(value, str) and value:
            texts.append(value)
        elif isinstance(value, (dict, list)) and value:
            texts.append(json.dumps(value, ensure_ascii=False))
    return texts


def _field_texts(request: ChatCompletionRequest) -> list[str]:
    """Text the template may render outside message contents: reasoning, names, tool calls, tools, documents."""
    texts = []
    for message in request.messages:
        texts += [text for text in (message.reasoning, message.name) if text]
        for call in message.tool_calls or []:
            if call.function and call.function.arguments:
                texts.append(call.function.arguments)
        if message.tools:
            texts.append(json.dumps(message.tools, ensure_ascii=False))
    for extra in (_template_tools(request), request.documents):
        if extra:
            texts.append(json.dumps(extra, ensure_ascii=False))
    return texts
