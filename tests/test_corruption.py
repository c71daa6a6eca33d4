"""Corruption functions, keys, entity scope, the spec schema and the zeroth-order optimiser."""
from __future__ import annotations

import json
import typing

import numpy as np
import pytest
import torch

from corruption.fluency import fluency_report
from corruption.functions import corrupt
from corruption.keys import keyed_generator
from corruption.probes import MultipleChoice, Probe
from corruption.scope import entity_mask
from corruption.spec import CorruptionSpec, Method
from corruption.trainer import MC_LOGPROBS, _letters_only, _mc_pick
from corruption.zo import ZerothOrderOptimizer
from vllm_client import BackendError

pytestmark = pytest.mark.unit

KEY = b"test-key"
SPECS = [
    CorruptionSpec(method="gaussian_first_n", dims=8, sigma=1.0),
    CorruptionSpec(method="gaussian_first_n", dims=3, sigma=[0.5, 1.0, 2.0]),
    CorruptionSpec(method="gaussian_top_k", dims=4, sigma=1.0),
    CorruptionSpec(method="gaussian_random_n", dims=5, sigma=1.0),
    CorruptionSpec(method="zero_first_n", dims=6),
    CorruptionSpec(method="zero_top_k", dims=3),
    CorruptionSpec(method="flip_sign_first_n", dims=6),
    CorruptionSpec(method="flip_sign_top_k", dims=3),
    CorruptionSpec(method="add_value", value=0.5),
    CorruptionSpec(method="subtract_value", value=0.5),
    CorruptionSpec(method="reverse_order"),
    CorruptionSpec(method="shuffle"),
]


def _embeds(tokens: int = 7, hidden: int = 16) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)


def test_every_method_is_covered():
    assert {s.method for s in SPECS} == set(typing.get_args(Method))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.method)
def test_shape_dtype_mask_and_untouched_rows_bit_identical(spec):
    x = _embeds()
    mask = torch.tensor([False, True, True, False, True, True, False])
    y = corrupt(x, spec, mask, keyed_generator(KEY, [1, 2, 3], "t"))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y[~mask], x[~mask])  # bit-identical
    assert not torch.equal(y[mask], x[mask])
    assert torch.equal(x, _embeds())  # the input is not modified in place


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.method)
def test_same_key_and_prompt_give_the_same_corruption(spec):
    x, mask = _embeds(), torch.ones(7, dtype=torch.bool)
    first = corrupt(x, spec, mask, keyed_generator(KEY, [5, 6, 7], "hp"))
    again = corrupt(x, spec, mask, keyed_generator(KEY, [5, 6, 7], "hp"))
    assert torch.equal(first, again)


def test_noise_depends_on_key_prompt_and_target():
    spec, x, mask = SPECS[0], _embeds(), torch.ones(7, dtype=torch.bool)
    base = corrupt(x, spec, mask, keyed_generator(KEY, [5, 6, 7], "hp"))
    for generator in (keyed_generator(b"other-key", [5, 6, 7], "hp"), keyed_generator(KEY, [5, 6, 8], "hp"),
                      keyed_generator(KEY, [5, 6, 7], "sw")):
        assert not torch.equal(base, corrupt(x, spec, mask, generator))


def test_method_semantics():
    x = _embeds().float()
    mask = torch.ones(7, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    zeroed = corrupt(x, CorruptionSpec(method="zero_first_n", dims=6), mask, g)
    assert torch.all(zeroed[:, :6] == 0) and torch.equal(zeroed[:, 6:], x[:, 6:])
    top = corrupt(x, CorruptionSpec(method="zero_top_k", dims=3), mask, g)
    kept_max = top.abs().max(dim=1).values
    third_largest = x.abs().topk(3, dim=1).values[:, 2]
    assert torch.all(kept_max <= third_largest) and torch.all((top == 0).sum(dim=1) >= 3)
    flipped = corrupt(x, CorruptionSpec(method="flip_sign_first_n", dims=4), mask, g)
    assert torch.equal(flipped[:, :4], -x[:, :4]) and torch.equal(flipped[:, 4:], x[:, 4:])
    reversed_ = corrupt(x, CorruptionSpec(method="reverse_order"), torch.tensor([0, 1, 1, 1, 0, 0, 0], dtype=torch.bool), g)
    assert torch.equal(reversed_[1:4], x[1:4].flip(0)) and torch.equal(reversed_[4:], x[4:])
    shuffled = corrupt(x, CorruptionSpec(method="shuffle"), mask, g)
    assert sorted(shuffled.sum(1).tolist()) == sorted(x.sum(1).tolist())
    added = corrupt(x, CorruptionSpec(method="add_value", value=2.0), mask, g)
    assert torch.allclose(added, x + 2.0)


def test_gaussian_strength_scales_the_noise():
    x = torch.zeros(400, 32)
    mask = torch.ones(400, dtype=torch.bool)
    for sigma in (0.1, 3.0):
        noise = corrupt(x, CorruptionSpec(method="gaussian_first_n", dims=16, sigma=sigma), mask,
                        torch.Generator().manual_seed(0))
        assert noise[:, :16].std().item() == pytest.approx(sigma, rel=0.05)
        assert torch.all(noise[:, 16:] == 0)


def test_empty_mask_changes_nothing_and_bad_input_is_refused():
    x = _embeds()
    spec = SPECS[0]
    assert torch.equal(corrupt(x, spec, torch.zeros(7, dtype=torch.bool), torch.Generator()), x)
    with pytest.raises(ValueError, match="mask"):
        corrupt(x, spec, torch.ones(3, dtype=torch.bool), torch.Generator())
    with pytest.raises(ValueError, match="hidden size"):
        corrupt(x, CorruptionSpec(method="zero_first_n", dims=99), torch.ones(7, dtype=torch.bool), torch.Generator())


@pytest.mark.parametrize("fields, message", [
    ({"method": "gaussian_first_n", "dims": 4}, "needs sigma"),
    ({"method": "gaussian_top_k", "sigma": 1.0}, "needs dims"),
    ({"method": "zero_top_k", "dims": 4, "sigma": 1.0}, "sigma applies only"),
    ({"method": "add_value"}, "needs value"),
    ({"method": "shuffle", "dims": 3}, "dims does not apply"),
    ({"method": "gaussian_top_k", "dims": 2, "sigma": [1.0, 2.0]}, "per-dimension"),
    ({"method": "gaussian_first_n", "dims": 3, "sigma": [1.0, 2.0]}, "2 entries but dims is 3"),
    ({"method": "gaussian_first_n", "dims": 3, "sigma": -1.0}, ">= 0"),
    ({"method": "gaussian_first_n", "dims": 3, "sigma": 1.0, "scope": "tokens"}, "scope"),
    ({"method": "blur"}, "method"),
])
def test_spec_validation_names_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        CorruptionSpec.model_validate(fields)


def test_spec_from_result_file(tmp_path):
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"format": "x", "spec": {"method": "gaussian_first_n", "dims": 4, "sigma": 2.5}}))
    spec = CorruptionSpec.from_result_file(result)
    assert spec.sigma == 2.5 and spec.strength == 2.5 and spec.with_strength(1.0).sigma == 1.0
    result.write_text(json.dumps({"spec": {"method": "gaussian_first_n", "dims": 4}}))
    with pytest.raises(ValueError, match="needs sigma"):
        CorruptionSpec.from_result_file(result)
    result.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CorruptionSpec.from_result_file(result)


def test_entity_mask_selects_overlapping_tokens_and_falls_back_to_all():
    text = "Tell me about hermione Granger, please"
    offsets = [(0, 0), (0, 4), (4, 7), (7, 13), (13, 18), (18, 22), (22, 30), (30, 31), (31, 38)]
    match = entity_mask(offsets, text, ["Hermione Granger", "Snape"])
    assert match.matched == ("Hermione Granger",) and not match.fell_back
    assert match.mask.tolist() == [False, False, False, False, True, True, True, False, False]
    none = entity_mask(offsets, text, ["Snape"])
    assert none.fell_back and none.mask.all()
    assert entity_mask([(0, 5)], "Harrys", ["Harry"]).fell_back  # word boundaries


def test_optimizer_converges_on_a_smooth_scalar_function():
    result = ZerothOrderOptimizer(lr=0.3, mu=0.05, max_steps=60, target=1e-4, patience=60).minimize(
        lambda s: float((np.log(s[0]) - np.log(3.0)) ** 2), 0.5)
    assert result.strength[0] == pytest.approx(3.0, rel=0.02)
    assert result.stopped == "target reached"
    assert [step.step for step in result.trace] == list(range(1, len(result.trace) + 1))


def test_optimizer_converges_on_a_vector_with_random_directions():
    goal = np.array([0.5, 2.0, 4.0])
    result = ZerothOrderOptimizer(lr=0.2, mu=0.05, max_steps=300, n_directions=4, target=1e-3, patience=300).minimize(
        lambda s: float(np.sum((np.log(s) - np.log(goal)) ** 2)), [1.0, 1.0, 1.0])
    assert np.allclose(result.strength, goal, rtol=0.05), result.strength


def test_optimizer_crosses_the_plateau_of_a_step_score():
    # like a probe hit rate: 0.8 until the strength passes 2.0, then 0.05; goal 0.05
    score = lambda s: 0.8 if s[0] < 2.0 else 0.05  # noqa: E731
    result = ZerothOrderOptimizer(max_steps=10).minimize(lambda s: abs(score(s) - 0.05), 0.5)
    assert result.objective == 0 and result.strength[0] >= 2.0 and result.stopped == "target reached"


def test_optimizer_stops_on_patience_and_budget():
    flat = ZerothOrderOptimizer(max_steps=50, patience=3).minimize(lambda s: 1.0, 1.0)
    assert flat.stopped == "no improvement in 3 steps" and len(flat.trace) == 3
    slow = ZerothOrderOptimizer(lr=0.01, max_steps=4, patience=10).minimize(lambda s: float(s[0]), 1.0)
    assert slow.stopped == "step budget spent" and len(slow.trace) == 4


def test_probe_answer_matching_and_multiple_choice_pick():
    probe = Probe("The headmaster is Albus", ("Dumbledore",))
    assert probe.answered_by(" dumbledore, of course") and not probe.answered_by(" Dumbledores")
    question = MultipleChoice("Which?", ("a", "b", "c", "d"), 2)
    assert question.prompt().endswith("D. d\nAnswer:") and question.chance == 0.25
    choice = {"logprobs": {"top_logprobs": [{" B": -2.0, " C": -0.5, "C": -3.0, " the": -0.1}]}}
    assert _mc_pick(choice, 4) == 2
    together = {"logprobs": {"top_logprobs": [{" A": -1.2, "A": -1.2, " B": -1.0}]}}
    assert _mc_pick(together, 4) == 0  # " A" and "A" are one letter: together they outweigh " B"
    not_letters = {"logprobs": {"top_logprobs": [{" A": -3.0, " B": -1.0, " ": -0.05, "\nA": -0.1, " E": -0.2}]}}
    assert _mc_pick(not_letters, 4) == 1  # a bare space, "\nA" and a letter past the options do not count
    with pytest.raises(BackendError, match="no option letter"):
        _mc_pick({"logprobs": {"top_logprobs": [{" the": -0.1}]}}, 4)


def test_mc_requests_allow_only_the_option_letters():
    assert _letters_only(3) == {"structured_outputs": {"choice": [" A", "A", " B", "B", " C", "C"]}}
    assert 2 * len(MultipleChoice.LETTERS) + 1 <= MC_LOGPROBS  # every allowed token's logprob comes back


def test_fluency_report():
    report = fluency_report(["", "a b c d", "x y z x y z x y z"])
    assert report["n"] == 3 and report["empty_rate"] == pytest.approx(1 / 3)
    assert report["repetitive_rate"] == pytest.approx(1 / 3)
    assert report["mean_unique_word_ratio"] == pytest.approx((1.0 + 3 / 9) / 2)
