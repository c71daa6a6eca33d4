"""Knowledge probes and multiple-choice questions: the data behind the unlearning scores."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Probe:
    """A cloze prompt and the answers that count as knowing it; `kind` says what the answer is (see
    corruption/counterfactual.py), None on probes that were never sorted."""

    prompt: str
    answers: tuple[str, ...]
    kind: str | None = None

    def answered_by(self, completion: str) -> bool:
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", completion, re.IGNORECASE) for a in self.answers)


@dataclass(frozen=True)
class MultipleChoice:
    question: str
    choices: tuple[str, ...]
    answer: int

    LETTERS = "ABCDEFGH"

    def prompt(self) -> str:
        options = "\n".join(f"{self.LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"Question: {self.question}\n{options}\nAnswer:"

    @property
    def chance(self) -> float:
        return 1 / len(self.choices)


def read_records(path: str | Path) -> list[dict]:
    """The JSON object on each non-blank line of a probe file."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
    return records


def read_probes(path: str | Path) -> list[Probe]:
    probes = []
    for number, r in enumerate(read_records(path), 1):
        if not isinstance(r.get("prompt"), str) or not r.get("answers"):
            raise ValueError(f"{path}: record {number} needs a 'prompt' string and a non-empty 'answers' list")
        probes.append(Probe(r["prompt"], tuple(r["answers"]), r.get("kind")))
    return probes


def read_multiple_choice(path: str | Path) -> list[MultipleChoice]:
    questions = []
    for number, r in enumerate(read_records(path), 1):
        choices = r.get("choices") or []
        if not isinstance(r.get("question"), str) or not 2 <= len(choices) <= 8 or \
                not isinstance(r.get("answer"), int) or not 0 <= r["answer"] < len(choices):
            raise ValueError(f"{path}: record {number} needs 'question', 2-8 'choices' and an 'answer' index")
        questions.append(MultipleChoice(r["question"], tuple(choices), r["answer"]))
    return questions
