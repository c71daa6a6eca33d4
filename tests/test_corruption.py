"""Corruption functions, keys, entity scope, the spec schema and the zeroth-order optimiser."""
from __future__ import annotations

import json
import math
import typing

import numpy as np
import pytest
import torch

from corruption.fluency import degenerate_rate, fluency_report
from corruption.functions import corrupt
from corruption.keys import keyed_generator
from corruption.probes import MultipleChoice, Probe, answer_probability, answer_spellings
from corruption.prompt import token_masks
from corruption.scope import entity_mask
from corruption.spec import CorruptionSpec, Method
from corruption.trainer import TOP_LOGPROBS, _letters_only, _mc_pick, _TwoSided, mean_upper_bound
from corruption.zo import Reading, SPSASearch, ZerothOrderOptimizer
from stats.intervals import wilson_interval
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
    ({"method": "zero_first_n", "dims": 3, "other_sigma": 1.0, "scope": "entities"}, "other_sigma applies only"),
    ({"method": "gaussian_first_n", "dims": 3, "sigma": 1.0, "other_sigma": 0.5}, "other_sigma needs scope"),
    ({"method": "gaussian_first_n", "dims": 3, "sigma": 1.0, "other_sigma": -1, "scope": "entities"}, "other_sigma"),
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


class _PieceTokenizer:
    """Spells "Dumbledore" as the model does, a letter first: " D", "umbled", "ore"."""

    PIECES = {" Dumbledore": [" D", "umbled", "ore"], "Dumbledore": ["D", "umbled", "ore"], " seven": [" seven"],
              "seven": ["seven"]}

    def __init__(self):
        self.vocabulary = sorted({p for pieces in self.PIECES.values() for p in pieces})

    def __call__(self, text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": [self.vocabulary.index(p) for p in self.PIECES[text]]}

    def decode(self, ids):
        return "".join(self.vocabulary[i] for i in ids)


def test_the_answer_probability_follows_the_answer_token_by_token():
    spellings = answer_spellings(_PieceTokenizer(), ("Dumbledore",))
    assert spellings == [(" D", "umbled", "ore"), ("D", "umbled", "ore")]
    followed = {"logprobs": {"tokens": [" D", "umbled", "ore", "."],
                             "top_logprobs": [{" D": -0.5, "D": -3.0, " Potter": -1.5}, {"umbled": -0.1, "ement": -4.0},
                                              {"ore": 0.0}, {".": -0.2}]}}
    # " D" then "umbled" then "ore": exact; the bare "D" turns away at once, so its first token alone counts
    assert answer_probability(spellings, followed) == pytest.approx(np.exp(-0.6) + np.exp(-3.0))
    turned = {"logprobs": {"tokens": [" Potter", ","], "top_logprobs": [{" Potter": -0.4, " D": -1.2}, {",": -0.1}]}}
    assert answer_probability(spellings, turned) == pytest.approx(np.exp(-1.2))  # a bound: the first token's
    assert answer_probability(spellings, {"logprobs": {"tokens": [" the"], "top_logprobs": [{" the": -0.1}]}}) == 0.0
    assert answer_probability(spellings, {"logprobs": None}) == 0.0
    assert answer_probability(answer_spellings(_PieceTokenizer(), ("seven",)),
                              {"logprobs": {"tokens": [" seven"], "top_logprobs": [{" seven": -0.2}]}}) == \
        pytest.approx(np.exp(-0.2))


def test_the_search_reading_holds_answer_probabilities_to_their_bound_only_when_asked():
    reading = _TwoSided({"named": 0.1, "common": 0.4}, {"named": 0.5, "common": 0.5}, 0.2,
                        {"named": 0.30, "common": 0.10})
    assert reading.reading({"named": 0.2, "common": 0.5}, 0.3).meets  # rates alone: met
    asked = reading.reading({"named": 0.2, "common": 0.5}, 0.3, {"named": 0.05, "common": 0.2})
    assert not asked.meets and asked.forget_excess == pytest.approx(0.5 * 0.25)
    assert mean_upper_bound([0.0] * 30) == pytest.approx(0.114, abs=0.001)  # as 0 of 30 answered: a guess allowed
    assert mean_upper_bound([1.0, 0.0, 0.0, 1.0]) == wilson_interval(2, 4)[1]  # yes-or-no values: the rate's bound
    assert mean_upper_bound([0.1, 0.3]) > mean_upper_bound([0.0, 0.2]) > 0.1
    with pytest.raises(ValueError, match="needs values"):
        mean_upper_bound([])


def test_the_probability_goal_needs_counterfactual_twins(tmp_path):
    from corruption.training import CorruptionTraining, train_corruption

    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "Harry's owl is", "answers": ["Hedwig"]}) + "\n")
    job = CorruptionTraining("http://127.0.0.1:9", tmp_path, tmp_path / "out.json", probes=probes,
                             probability_goal=True)
    with pytest.raises(ValueError, match="--probability-goal needs --counterfactual"):
        train_corruption(job)


def test_mc_requests_allow_only_the_option_letters():
    assert _letters_only(3) == {"structured_outputs": {"choice": [" A", "A", " B", "B", " C", "C"]}}
    assert 2 * len(MultipleChoice.LETTERS) + 1 <= TOP_LOGPROBS  # every allowed token's logprob comes back


def test_fluency_report():
    report = fluency_report(["", "a b c d", "x y z x y z x y z"])
    assert report["n"] == 3 and report["empty_rate"] == pytest.approx(1 / 3)
    assert report["repetitive_rate"] == pytest.approx(1 / 3)
    assert report["mean_unique_word_ratio"] == pytest.approx((1.0 + 3 / 9) / 2)


def test_specs_written_before_other_sigma_load_and_mean_what_they_meant():
    shipped = CorruptionSpec.from_result_file("demo/star_wars/corruption.json")
    # its strength was learned with every token corrupted, <bos> and the template's too, and it says so
    assert shipped.scope == "all" and shipped.other_sigma is None and shipped.corrupt_special_tokens
    learned = CorruptionSpec.from_result_file("demo/harry_potter/corruption.json")
    # learned on the names its counterfactual twins swap, the rest and the special tokens untouched
    assert learned.scope == "entities" and learned.other_sigma is None and not learned.corrupt_special_tokens
    assert {"Hermione", "Hogwarts", "Voldemort"} <= set(learned.entities)
    old_entities = CorruptionSpec.model_validate({"method": "gaussian_first_n", "dims": 4, "sigma": 2.0,
                                                  "value": None, "scope": "entities"})
    masks = token_masks(old_entities, [2, 10, 11, 12], [(0, 0), (0, 4), (4, 13), (13, 22)],
                        "Tell me about Hermione", ["Hermione"], {2})
    assert masks.primary.tolist() == [False, False, False, True]
    assert old_entities.other_sigma is None  # so corrupted_embeddings leaves the other tokens untouched, as before


TOKENS = [2, 105, 10, 11, 12, 106]  # <bos> <start_of_turn> Tell me-about Hermione <end_of_turn>
OFFSETS = [(0, 0), (0, 15), (15, 19), (19, 28), (28, 37), (37, 50)]
TEXT = "<start_of_turn>Tell me about Hermione<end_of_turn>"
SPECIAL = {2, 105, 106}


def test_special_tokens_are_left_alone_unless_the_spec_says_so():
    spec = CorruptionSpec(method="gaussian_first_n", dims=4, sigma=1.0)
    assert token_masks(spec, TOKENS, OFFSETS, TEXT, [], SPECIAL).primary.tolist() == \
        [False, False, True, True, True, False]
    every = spec.with_fields(corrupt_special_tokens=True)
    assert token_masks(every, TOKENS, OFFSETS, TEXT, [], SPECIAL).primary.all()


def test_entity_and_other_tokens_get_their_own_strengths():
    spec = CorruptionSpec(method="gaussian_first_n", dims=16, sigma=4.0, other_sigma=0.25, scope="entities")
    masks = token_masks(spec, TOKENS, OFFSETS, TEXT, ["Hermione"], SPECIAL)
    assert masks.primary.tolist() == [False, False, False, False, True, False]
    assert masks.other.tolist() == [False, False, True, True, False, False]
    x = torch.zeros(6, 16)
    out = corrupt(corrupt(x, spec, masks.primary, keyed_generator(KEY, TOKENS, "t")), spec.for_other_tokens(),
                  masks.other, torch.Generator().manual_seed(1))
    assert out[masks.primary].std() > 2.0 and 0.1 < out[masks.other].std() < 0.5
    assert torch.equal(out[[0, 1, 5]], x[[0, 1, 5]])
    unmatched = token_masks(spec, TOKENS, OFFSETS, TEXT, ["Snape"], SPECIAL)  # no term: every content token
    assert unmatched.primary.tolist() == [False, False, True, True, True, False] and not unmatched.other.any()


def test_degenerate_rate_counts_empty_and_repetitive_outputs():
    assert degenerate_rate(["", "a b c a b c a b c", "a plain sentence of words", "   "]) == 0.75
    with pytest.raises(ValueError):
        degenerate_rate([])


def _two_strength_goal(point: np.ndarray) -> Reading:
    """A noisy step-like stand-in for the backend: the answer rate falls as entity noise plus half the
    other noise grows (met at 1.3, give or take a deterministic jitter of 0.005), and output degenerates once
    the other noise passes 2.0."""
    strength = point[0] + 0.5 * point[1]
    rate = float(np.clip(1.4 - strength, 0.0, 1.0)) + 0.005 * math.sin(1e3 * strength)
    return Reading(max(0.0, rate - 0.1), max(0.0, point[1] - 2.0))


def test_spsa_finds_the_smallest_strengths_that_meet_a_noisy_step_like_goal():
    search = SPSASearch(lr=1.0, max_steps=10, bisections=5, seed=3)
    result = search.search(_two_strength_goal, [0.1, 0.1])
    assert result.met and _two_strength_goal(np.array(result.strengths)).meets
    bisections = [e for e in result.evaluations if e.phase == "bisection"]
    assert len(bisections) == 5
    met = [e for e in result.evaluations if e.phase != "bisection" and e.reading.meets][-1]
    effective = lambda s: s[0] + 0.5 * s[1]  # noqa: E731
    failed = [effective(e.strengths) for e in bisections if not e.reading.meets]
    # smallest on its ray: one bisection step above the largest scale that missed
    assert failed and effective(result.strengths) - max(failed) <= effective(met.strengths) / 2 ** 5 + 1e-9
    assert 1.29 <= effective(result.strengths) <= 1.31 + effective(met.strengths) / 2 ** 5
    again = SPSASearch(lr=1.0, max_steps=10, bisections=5, seed=3).search(_two_strength_goal, [0.1, 0.1])
    assert again.strengths == result.strengths and \
        [e.strengths for e in again.evaluations] == [e.strengths for e in result.evaluations]


def test_spsa_in_one_dimension_crosses_a_plateau():
    def step_goal(point: np.ndarray) -> Reading:  # like a probe hit rate: 0.8 below 2.0, 0.05 from there
        return Reading(0.75 if point[0] < 2.0 else 0.0, 0.0)

    result = SPSASearch(max_steps=6, bisections=6).search(step_goal, [0.5])
    met = next(e for e in result.evaluations if e.reading.meets)
    assert result.met and 2.0 <= result.strengths[0] <= 2.0 + met.strengths[0] / 2 ** 6
    assert [e.phase for e in result.evaluations][:4] == ["start", "spsa+", "spsa-", "step"]


def test_spsa_steps_down_from_a_corruption_that_also_erases_what_a_model_never_taught_would_guess():
    def goal(point: np.ndarray) -> Reading:  # the rate must stay inside the reference's interval [0.1, 0.3]
        rate = 1 / (1 + point[0])
        return Reading(max(0.0, rate - 0.3), 0.0, max(0.0, 0.1 - rate))

    result = SPSASearch(max_steps=8, bisections=4).search(goal, [20.0])
    assert not result.evaluations[0].reading.meets and result.evaluations[0].reading.keep_excess > 0
    assert result.met and 0.1 <= 1 / (1 + result.strengths[0]) <= 0.3
    assert all(e.strengths[0] < 20.0 for e in result.evaluations if e.phase == "step")


def test_spsa_reports_a_goal_it_cannot_meet():
    def never(point: np.ndarray) -> Reading:  # forgetting needs more noise than fluency allows
        return Reading(max(0.0, 0.5 - 0.1 * point[0]), max(0.0, point[0] - 1.0))

    result = SPSASearch(max_steps=3).search(never, [0.5])
    assert not result.met and result.stopped == "goal not met in 3 steps" and len(result.evaluations) == 10


def _searched(met: bool, degenerate: float, spread_named: list[float], search_degenerate: float = 0.0,
              spread_common: tuple[float, ...] = (0.6,), spread_probability: tuple[float, ...] | None = None) -> dict:
    """A search's result as the selection reads it: the fluency check's rate, the search's own key's, and the
    rates (and, if given, the named answer probabilities) under the spread's keys; references: named at most 0.1,
    common in [0.4, 0.8], named probability at most 0.1 when asked."""
    goal = {"forget_upper_by_kind": {"named": 0.1, "common": 0.8}, "keep_lower_by_kind": {"named": 0.0, "common": 0.4}}
    spread = {"rates_by_kind": {"named": spread_named, "common": list(spread_common)},
              "answer_probability_by_kind": None}  # as the trainer writes it when not asked
    if spread_probability is not None:
        goal["answer_probability_upper_by_kind"] = {"named": 0.1}
        spread["answer_probability_by_kind"] = {"named": list(spread_probability)}
    return {"met": met, "final": {"degenerate_rate": search_degenerate},
            "fluency_check": {"degenerate_rate": degenerate}, "goal": goal, "spread": spread}


def test_the_trainer_keeps_the_candidate_that_forgets_with_the_most_fluent_output_in_the_fluency_check():
    from corruption.training import choose_candidate

    noisy = _searched(True, 0.5, [0.05])
    lucky = _searched(True, 0.4, [0.05], search_degenerate=0.0)  # fluent under the search's key only
    fluent = _searched(True, 0.1, [0.2], search_degenerate=0.3)
    missed = _searched(False, 0.0, [0.4])
    assert choose_candidate([noisy, lucky, fluent, missed]) == 2  # met first, then the fewest degenerate ones
    steady = _searched(True, 0.1, [0.05, 0.08])
    assert choose_candidate([fluent, steady]) == 1  # as fluent: the one that forgets under every key
    assert choose_candidate([missed]) == 0
    over_forgets = _searched(True, 0.1, [0.0], spread_common=(0.6, 0.2))  # common under its interval, one key
    assert choose_candidate([over_forgets, steady]) == 1
    probable = _searched(True, 0.1, [0.05], spread_probability=(0.05, 0.3))  # named probability over its bound
    assert choose_candidate([probable, _searched(True, 0.1, [0.09], spread_probability=(0.05, 0.08))]) == 1


def test_a_candidate_on_fewer_dimensions_starts_with_the_same_noise_energy_per_token():
    from corruption.training import _candidate_spec

    spec = CorruptionSpec(method="gaussian_first_n", dims=640, sigma=2.0, scope="entities", entities=["Harry"])
    top = _candidate_spec(spec, "gaussian_top_k", 64, 2.0, 640)
    assert (top.method, top.dims, top.scope, top.entities) == ("gaussian_top_k", 64, "entities", ["Harry"])
    assert top.sigma ** 2 * 64 == pytest.approx(2.0 ** 2 * 640)


@pytest.mark.parametrize("argument, message", [
    ("zero_top_k:8", "is not one of"), ("gaussian_top_k:0", "positive whole number"),
    ("gaussian_top_k:x", "positive whole number")])
def test_candidates_on_the_command_line_are_gaussian_methods_with_a_positive_dimension_count(
        argument, message, capsys):
    from proxy.cli import main

    with pytest.raises(SystemExit):
        main(["corruption", "train", "--backend-url", "http://127.0.0.1:9", "--model-dir", ".", "--out", "x.json",
              "--candidates", argument])
    assert message in capsys.readouterr().err


def test_candidates_need_counterfactual_twins(tmp_path):
    from corruption.training import CorruptionTraining, train_corruption

    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "Harry's owl is", "answers": ["Hedwig"]}) + "\n")
    job = CorruptionTraining("http://127.0.0.1:9", tmp_path, tmp_path / "out.json", probes=probes,
                             candidates=(("gaussian_top_k", 64),))
    with pytest.raises(ValueError, match="--candidates needs --counterfactual"):
        train_corruption(job)


def test_a_fluency_check_set_needs_candidates_to_choose_between(tmp_path):
    from corruption.training import CorruptionTraining, train_corruption

    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "Harry's owl is", "answers": ["Hedwig"]}) + "\n")
    passages = tmp_path / "passages.jsonl"
    passages.write_text(json.dumps({"prompt": "Ron and Hermione walked to the"}) + "\n")
    job = CorruptionTraining("http://127.0.0.1:9", tmp_path, tmp_path / "out.json", probes=probes,
                             fluency_check_prompts=passages)
    with pytest.raises(ValueError, match="--fluency-check-prompts needs two --candidates"):
        train_corruption(job)


@pytest.mark.parametrize("line", ['{"text": "no prompt field"}', '["a list"]', '{"prompt": "  "}', "not json"])
def test_fluency_check_prompts_name_the_line_that_holds_no_prompt(tmp_path, line):
    from corruption.training import read_prompts

    path = tmp_path / "passages.jsonl"
    path.write_text(json.dumps({"prompt": "Neville found Trevor under the"}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError, match=r"passages.jsonl:3: .*non-empty \"prompt\""):
        read_prompts(path)
    path.write_text(json.dumps({"prompt": "Neville found Trevor under the"}) + "\n")
    assert read_prompts(path) == ["Neville found Trevor under the"]


def test_chat_routes_need_counterfactual_twins_and_name_the_routes(tmp_path):
    from corruption.training import CorruptionTraining, train_corruption

    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "Harry's owl is", "answers": ["Hedwig"]}) + "\n")
    job = CorruptionTraining("http://127.0.0.1:9", tmp_path, tmp_path / "out.json", probes=probes, routes=("chat",))
    with pytest.raises(ValueError, match="--routes chat needs --counterfactual"):
        train_corruption(job)
    job = CorruptionTraining("http://127.0.0.1:9", tmp_path, tmp_path / "out.json", probes=probes, routes=("voice",))
    with pytest.raises(ValueError, match="--routes takes one or both of completion, chat, not voice"):
        train_corruption(job)


class _TemplateTokenizer:
    """A chat template that, like Gemma's, begins with <bos> and leaves the model's turn open."""

    bos_token = "<bos>"

    def apply_chat_template(self, messages, continue_final_message, tokenize):
        assert continue_final_message and not tokenize
        return "<bos>" + "".join(f"<turn>{m['role']}\n{m['content']}" for m in messages)


def test_a_probe_as_a_chat_keeps_its_answers_and_leaves_the_bos_to_the_tokenizer():
    from corruption.probes import CHAT_ASK, as_chats

    [chat] = as_chats([Probe("Harry's owl is", ("Hedwig",), "named")], _TemplateTokenizer())
    assert chat == Probe(f"<turn>user\n{CHAT_ASK}<turn>assistant\nHarry's owl is", ("Hedwig",), "chat:named")
