"""Server-sent events as vLLM streams them: `data: {json}` lines, ended by `data: [DONE]`."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

DONE = b"data: [DONE]\n\n"


def parse_line(line: str) -> tuple[bool, dict[str, Any] | None]:
    """(is an event, its JSON or None for `[DONE]`) for one line of the stream."""
    if not line.startswith("data:"):
        return False, None
    payload = line[5:].strip()
    return True, None if payload == "[DONE]" else json.loads(payload)


async def events(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any] | None]:
    """Parsed `data:` events; None stands for `[DONE]`."""
    async for line in lines:
        is_event, event = parse_line(line)
        if is_event:
            yield event


def encode(payload: dict[str, Any]) -> bytes:
    """One event, as compact JSON."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
