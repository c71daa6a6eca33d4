"""Knowledge probes and multiple-choice questions: the data behind the unlearning scores."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A probe asked as a chat: the user asks for a completion, the model's turn begins with the probe (a base model
# asked a question in a chat repeats it). `eco-proxy eval` asks its chat probes so, and the trainer learns on them.
CHAT_ASK = "Complete the sentence."
CHAT_KIND_PREFIX = "chat:"


@dataclass(frozen=True)
class Probe:
    """A cloze prompt and the answers that count as knowing it; `kind` says what the answer is (see
    corruption/counterfactual.py), None on probes that were never sorted."""

    prompt: str
    answers: tuple[str, ...]
    kind: str | None = None

    def answered_by(self, completion: str) -> bool:
        return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", completion, re.IGNORECASE) for a in self.answers)


def probe_chat(prompt: str) -> list[dict[str, str]]:
    """The conversation that asks `prompt` as a chat (rendered with continue_final_message)."""
    return [{"role": "user", "content": CHAT_ASK}, {"role": "assistant", "content": prompt}]


def as_chats(probes: Sequence[Probe], tokenizer: Any) -> list[Probe]:
    """Each probe as a chat rendered with the model's template, kind "chat:<kind>" (each route is held to
    its own reference). The template's leading <bos> is cut: the trainer's tokenizer adds it to every prompt,
    and two would be a prompt vLLM never sees."""
    chats = []
    for probe in probes:
        rendered = tokenizer.apply_chat_template(probe_chat(probe.prompt), continue_final_message=True,
                                                 tokenize=False)
        bos = tokenizer.bos_token or ""
        chats.append(Probe(rendered[len(bos):] if bos and rendered.startswith(bos) else rendered, probe.answers,
                           f"{CHAT_KIND_PREFIX}{probe.kind}"))
    return chats


# Logprobs asked per answer, vLLM's default maximum: every token a multiple-choice answer allows (each letter
# with and without its space, and the bare space the grammar allows before a letter) fits in it.
TOP_LOGPROBS = 20


def answer_spellings(tokenizer: Any, answers: Sequence[str]) -> list[tuple[str, ...]]:
    """Each answer as the model's tokens spell it after a word (with a leading space) and at the start of a
    line (without), each token as the backend's logprobs show it."""
    spellings = []
    for answer in answers:
        for text in (" " + answer, answer):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            spellings.append(tuple(tokenizer.decode([token]) for token in ids))
    return list(dict.fromkeys(spelling for spelling in spellings if spelling))


def answer_probability(spellings: Sequence[Sequence[str]], choice: Mapping[str, Any]) -> float:
    """The probability that the continuation begins with an answer, summed over its spellings, from a choice
    asked with logprobs. Along each spelling, the product of its tokens' probabilities while the greedy
    continuation follows it (exact when it writes the whole answer); where the continuation turns away, or ends,
    the product up to there: the probability of the answer's first tokens, an upper bound. A token outside the
    top logprobs counts as 0."""
    logprobs = choice.get("logprobs") or {}
    written, top = logprobs.get("tokens") or [], logprobs.get("top_logprobs") or []
    total = 0.0
    for spelling in spellings:
        probability = 0.0
        for position, token in enumerate(spelling[:len(top)]):
            logprob = (top[position] or {}).get(token, -math.inf)
            probability = (1.0 if position == 0 else probability) * math.exp(logprob)
            if probability == 0.0 or position >= len(written) or written[position] != token:
                break
        total += probability
    return min(total, 1.0)


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
