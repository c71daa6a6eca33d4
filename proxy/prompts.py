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

    text: str  # the decoded/rendered prompt, what the classifier reads whole
    token_ids: list[int]
    offsets: list[tuple[int, int]]  # each token's character span in `text`, for entity scope
    segments: tuple[str, ...]  # pieces classified separately as well (e.g. each message)


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
        return Prompt(text, list(item), offsets, (self.tokenizer.decode(item, skip_special_tokens=True),))

    def chat_prompt(self, request: ChatCompletionRequest) -> Prompt:
        messages = [_template_message(m) for m in request.messages]
        rendered = self.tokenizer.apply_chat_template(
            messages,
            tools=request.tools,
            documents=request.documents,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message,
            tokenize=False,
            **(request.chat_template_kwargs or {}),
        )
        # vLLM tokenizes a rendered chat without adding special tokens: the template has them.
        encoded = self.tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        segments = [m["content"] for m in messages if m["content"]]
        segments += _tool_texts(request)
        return Prompt(rendered, encoded.input_ids, encoded.offset_mapping, tuple(segments))


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """The message as the template receives it: text parts joined by newlines, as vLLM does."""
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text or "" for part in content if part.type == "text")
    rendered: dict[str, Any] = message.model_dump(exclude_none=True)
    rendered["content"] = content or ""
    return rendered


def _tool_texts(request: ChatCompletionRequest) -> list[str]:
    """Tool definitions, tool-call arguments and documents can carry the target too."""
    texts = []
    for message in request.messages:
        for call in message.tool_calls or []:
            if call.function and call.function.arguments:
                texts.append(call.function.arguments)
    for extra in (request.tools, request.documents):
        if extra:
            texts.append(json.dumps(extra, ensure_ascii=False))
    return texts
