"""The decision rule and the flagged prompt's embeddings, with stub classifiers (pure logic)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from corruption.spec import CorruptionSpec
from proxy.guard import Guard
from proxy.observability import Metrics
from proxy.policy import ActivePolicy, ActiveTarget
from proxy.prompts import Prompt

pytestmark = pytest.mark.unit


class StubClassifier:
    def __init__(self, score: float | Exception):
        self.score = score
        self.seen: list[list[str]] = []

    def score_segments(self, segments: list[str], stop_above: float | None = None) -> float:
        self.seen.append(segments)
        if isinstance(self.score, Exception):
            raise self.score
        return self.score


class StubTable:
    hidden_size = 8

    def embed(self, ids: list[int]) -> torch.Tensor:
        return torch.arange(len(ids) * 8, dtype=torch.float32).reshape(len(ids), 8).to(torch.bfloat16)


NOISE = CorruptionSpec(method="gaussian_first_n", dims=8, sigma=1.0)
ENTITY_NOISE = CorruptionSpec(method="gaussian_first_n", dims=8, sigma=1.0, scope="entities")
BOS = 2
PROMPT = Prompt("Tell me about Hermione", [BOS, 10, 11, 12], [(0, 0), (0, 4), (4, 13), (13, 22)],
                ("Tell me about Hermione",))


def _target(name: str, score, threshold: float = 0.5, fail_mode: str = "closed", spec=NOISE,
            entities=("Hermione",)) -> ActiveTarget:
    return ActiveTarget(name, StubClassifier(score), threshold, spec, tuple(entities), fail_mode)


def _policy(*targets: ActiveTarget) -> ActivePolicy:
    return ActivePolicy("v1", tuple(targets), False, Path("policy.yaml"))


@pytest.fixture
def guard() -> Guard:
    return Guard(StubTable(), b"key", Metrics(), special_token_ids={BOS})


def test_unflagged_prompt_embeds_exactly(guard):
    decision = guard.decide(_policy(_target("hp", 0.2)), PROMPT)
    assert not decision.flagged and decision.top.score == 0.2
    assert torch.equal(guard.prompt_embeddings(PROMPT, decision), StubTable().embed(PROMPT.token_ids))


def test_score_equal_to_threshold_is_not_flagged(guard):
    assert not guard.decide(_policy(_target("hp", 0.5)), PROMPT).flagged


def test_largest_margin_decides_and_ties_go_to_the_first_listed(guard):
    decision = guard.decide(_policy(_target("a", 0.7, 0.6), _target("b", 0.8, 0.5), _target("c", 0.9, 0.85)), PROMPT)
    assert decision.deciding.target.name == "b"
    tie = guard.decide(_policy(_target("a", 0.7, 0.5), _target("b", 0.7, 0.5)), PROMPT)
    assert tie.deciding.target.name == "a"


def test_classifier_failure_fails_closed_by_default_and_open_on_request(guard):
    closed = guard.decide(_policy(_target("hp", RuntimeError("boom"))), PROMPT)
    assert closed.flagged and closed.deciding.score is None
    opened = guard.decide(_policy(_target("hp", RuntimeError("boom"), fail_mode="open")), PROMPT)
    assert not opened.flagged
    errors = guard.metrics.classifier_errors
    assert errors.labels("hp", "closed")._value.get() == 1 and errors.labels("hp", "open")._value.get() == 1


def test_every_segment_is_classified_once(guard):
    target = _target("hp", 0.1)
    prompt = Prompt("<turn>system\nA\n<turn>user\nB", [2, 3], [(0, 1), (1, 2)],
                    ("<turn>system\nA\n<turn>user\nB", "A", "B", "A"))
    guard.decide(_policy(target), prompt)
    assert target.classifier.seen == [["<turn>system\nA\n<turn>user\nB", "A", "B"]]


def test_flagged_embeddings_are_corrupted_deterministically(guard):
    policy = _policy(_target("hp", 0.9))
    decision = guard.decide(policy, PROMPT)
    first = guard.prompt_embeddings(PROMPT, decision)
    assert not torch.equal(first, StubTable().embed(PROMPT.token_ids))
    assert torch.equal(first, guard.prompt_embeddings(PROMPT, decision))
    other_key = Guard(StubTable(), b"other", Metrics(), special_token_ids={BOS}).prompt_embeddings(PROMPT, decision)
    assert not torch.equal(first, other_key)


def test_entity_scope_corrupts_only_the_entity_tokens(guard):
    decision = guard.decide(_policy(_target("hp", 0.9, spec=ENTITY_NOISE)), PROMPT)
    clean, corrupted = StubTable().embed(PROMPT.token_ids), guard.prompt_embeddings(PROMPT, decision)
    changed = [not torch.equal(clean[i], corrupted[i]) for i in range(4)]
    assert changed == [False, False, False, True]


def _changed_rows(guard: Guard, spec: CorruptionSpec) -> list[bool]:
    decision = guard.decide(_policy(_target("hp", 0.9, spec=spec)), PROMPT)
    clean, corrupted = StubTable().embed(PROMPT.token_ids), guard.prompt_embeddings(PROMPT, decision)
    return [not torch.equal(clean[i], corrupted[i]) for i in range(len(PROMPT.token_ids))]


def test_special_tokens_stay_uncorrupted_unless_the_spec_says_so(guard):
    assert _changed_rows(guard, NOISE) == [False, True, True, True]
    assert _changed_rows(guard, NOISE.with_fields(corrupt_special_tokens=True)) == [True, True, True, True]


def test_other_tokens_get_their_own_strength(guard):
    both = ENTITY_NOISE.with_fields(other_sigma=0.5)
    assert _changed_rows(guard, both) == [False, True, True, True]
    decision = guard.decide(_policy(_target("hp", 0.9, spec=both)), PROMPT)
    clean, corrupted = StubTable().embed(PROMPT.token_ids).float(), guard.prompt_embeddings(PROMPT, decision).float()
    # the entity token's noise is drawn first, so adding noise elsewhere leaves it as it was
    entity_only = guard.prompt_embeddings(PROMPT, guard.decide(_policy(_target("hp", 0.9, spec=ENTITY_NOISE)), PROMPT))
    assert torch.equal(corrupted[3], entity_only[3].float())
    assert not torch.equal(corrupted[1:3], clean[1:3])
