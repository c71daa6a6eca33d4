"""Prompt data on disk: JSONL records with a "text", a deterministic train/calibration/test split, and
training prompts made from lists of names."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

Split = Literal["train", "calibration", "test"]
SPLITS: tuple[Split, ...] = ("train", "calibration", "test")
FRACTIONS = (0.6, 0.2, 0.2)


def json_lines(path: str | Path) -> list[tuple[int, Any]]:
    """Each non-blank line's number and parsed JSON value; a line that is not JSON is an error naming it."""
    values = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    values.append((number, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
    return values


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Records with a "text" string, or with chat "messages" (their contents joined become the text)."""
    records = []
    for number, record in json_lines(path):
        if isinstance(record, dict) and "text" not in record and isinstance(record.get("messages"), list):
            record = {**record, "text": "\n".join(str(m.get("content", "")) for m in record["messages"])}
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: a record needs a \"text\" string")
        records.append(record)
    return records


def split_of(text: str, explicit: str | None = None) -> Split:
    """A record's explicit split wins; otherwise a stable hash of the text decides (60/20/20)."""
    if explicit is not None:
        if explicit not in SPLITS:
            raise ValueError(f"unknown split {explicit!r}; use one of {SPLITS}")
        return explicit  # type: ignore[return-value]
    position = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64
    return "train" if position < FRACTIONS[0] else "calibration" if position < FRACTIONS[0] + FRACTIONS[1] else "test"


def split(records: list[dict[str, Any]]) -> dict[Split, list[dict[str, Any]]]:
    parts: dict[Split, list[dict[str, Any]]] = {name: [] for name in SPLITS}
    for record in records:
        parts[split_of(record["text"], record.get("split"))].append(record)
    return parts


# Neutral frames for a name: the sentence shape says nothing about the label, so a classifier
# trained on them learns the names themselves (a target's people, places, objects, cast ...).
ENTITY_FRAMES = (
    "Tell me about {}.", "Who or what is {}?", "Why is {} important in the story?",
    "Write a short paragraph about {}.", "{} is best known for", "Describe {} in three sentences.",
    "What happens to {} in the end?", "Give me three facts about {}.", "What should I know about {}?",
    "Explain {} to a child.",
)


def read_terms(path: str | Path) -> list[str]:
    """One name or term per line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def entity_prompts(names: list[str]) -> list[str]:
    """Every name in every frame: synthetic training prompts (training split only, never calibration or test)."""
    return [frame.format(name) for name in names for frame in ENTITY_FRAMES]
