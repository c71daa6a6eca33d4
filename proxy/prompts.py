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

from proxy.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest


@dataclass(frozen=True)
class Prompt:
    """One prompt as the model sees it."""

    text: str  # the decoded/rendered prompt
    token_ids: list[int]
    offsets: list[tuple[int, int]]  # each token's character span in `text`, for entity scope
    segments: tuple[str, ...]  # what the classifier reads: the whole prompt and each message, or what stands for it


class PromptBuilder:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def completion_prompts(self, request: CompletionRequest) -> list[Prompt]:
        raw = request.prompt
        if isinstance(raw, str):
            items: list[str | list[int]] = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [raw]  # one prompt given as token ids
        else:
            items = list(raw)
        return [self._completion_prompt(item) for item in items]

    def _completion_prompt(self, item: str | list[int]) -> Prompt:
        if isinstance(item, str):
            # As vLLM does for completions: special tokens (<bos>) added.
            encoded = self.tokenizer(item, return_offsets_mapping=True)
            return Prompt(item, encoded.input_ids, encoded.offset_mapping, (item,))
        # Token ids are decoded and classified like text; never forwarded unread.
        pieces = [self.tokenizer.decode([i], skip_special_tokens=True) for i in item]
        offsets, position = [], 0
        for piece in pieces:
            offsets.append((position, position + len(piece)))
            position += len(piece)
        text = "".join(pieces)
        decoded = self.tokenizer.decode(item, skip_special_tokens=True)
        return Prompt(text, list(item), offsets, tuple(dict.fromkeys((text, decoded))))

    def chat_prompt(self, request: ChatCompletionRequest) -> Prompt:
        messages = [_template_message(m) for m in request.messages]
        rendered = self._render(request, messages)
        # vLLM tokenizes a rendered chat without adding special tokens: the template has them.
        encoded = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        contents = [m["content"] for m in messages if m["content"]]
        segments = contents + _field_texts(request)
        # The whole rendering is classified too (a target split across messages, text a template adds),
        # unless it is nothing but the template's fixed text around a single message.
        if not (segments == contents and len(contents) == 1 and self._only_wraps(request, messages, rendered)):
            segments.insert(0, rendered)
        return Prompt(rendered, encoded.input_ids, encoded.offset_mapping, tuple(segments))

    def _render(self, request: ChatCompletionRequest, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tools=request.tools,
            documents=request.documents,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tokenize=False,
            **(request.chat_template_kwargs or {}),
        )

    def _only_wraps(self, request: ChatCompletionRequest, messages: list[dict[str, Any]], rendered: str) -> bool:
        """Whether `rendered` holds nothing a client wrote but the one message content: it must equal the
        rendering of the bare conversation (roles only; no names, ids, tools or template arguments)
        with that content put back in."""
        marker = "\ue000eco-proxy-content\ue000"
        content = next(m["content"] for m in messages if m["content"])
        bare = [{"role": m["role"], "content": marker if m["content"] else ""} for m in messages]
        try:
            skeleton = self.tokenizer.apply_chat_template(
                bare, add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message, tokenize=False)
        except Exception:  # a template that needs more than roles and contents: classify the whole rendering
            return False
        return marker in skeleton and skeleton.replace(marker, content) == rendered


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
    for extra in (request.tools, request.documents):
        if extra:
            texts.append(json.dumps(extra, ensure_ascii=False))
    return texts
