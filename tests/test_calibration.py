"""PAC thresholds: the FPR bound holds over calibration sets, checked by simulation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from classifier.calibration import allowed_above, minimum_n, mondrian_threshold, pac_threshold, rate_with_interval

pytestmark = pytest.mark.unit


def test_threshold_is_the_order_statistic_the_binomial_tail_allows():
    scores = np.linspace(0, 1, 500, endpoint=False)
    alpha, delta = 0.05, 0.1
    k = allowed_above(500, alpha, delta)
    assert binom.cdf(k, 500, alpha) <= delta < binom.cdf(k + 1, 500, alpha)
    threshold = pac_threshold(np.random.default_rng(0).permutation(scores), alpha, delta)
    assert int((scores > threshold).sum()) == k


def test_too_few_scores_flag_nothing_and_say_how_many_are_needed():
    needed = minimum_n(0.01, 0.05)
    assert needed == math.ceil(math.log(0.05) / math.log(0.99))  # 299
    with pytest.warns(UserWarning, match=f"{needed - 1} calibration scores.*at least {needed}"):
        assert pac_threshold(np.zeros(needed - 1), 0.01, 0.05) == 1.0
    assert pac_threshold(np.arange(needed) / needed, 0.01, 0.05) == (needed - 1) / needed  # the maximum


@pytest.mark.parametrize("n, alpha, delta", [(200, 0.1, 0.1), (1000, 0.02, 0.05)])
def test_the_bound_holds_over_many_calibration_sets(n, alpha, delta):
    # Scores uniform on [0, 1): a threshold t has true FPR 1 - t.
    rng = np.random.default_rng(1)
    trials = 4000
    draws = rng.random((trials, n))
    thresholds = np.array([pac_threshold(row, alpha, delta) for row in draws])
    exceed = float(np.mean(1 - thresholds > alpha))
    assert exceed <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)
    assert exceed >= binom.cdf(allowed_above(n, alpha, delta), n, alpha) - 3 * math.sqrt(delta / trials)  # tight


def test_mondrian_serves_the_largest_group_threshold():
    rng = np.random.default_rng(2)
    groups = {"everyday": rng.random(400) * 0.5, "namesakes": rng.random(400)}
    served, report = mondrian_threshold(groups, 0.05, 0.1)
    assert served == report["namesakes"]["threshold"] == pac_threshold(groups["namesakes"], 0.05, 0.1)
    assert report["everyday"]["threshold"] < served
    assert report["everyday"]["n"] == 400 and report["everyday"]["n_needed"] == minimum_n(0.05, 0.1)
    with pytest.warns(UserWarning, match="group 'tiny'"):
        served, report = mondrian_threshold({**groups, "tiny": rng.random(5)}, 0.05, 0.1)
    assert served == 1.0 and report["tiny"]["allowed_above"] == -1


def test_rate_with_interval():
    assert rate_with_interval(0, 0) == {"hits": 0, "n": 0, "rate": None, "ci": None}
    report = rate_with_interval(5, 100)
    assert report["rate"] == 0.05 and report["ci"][0] < 0.05 < report["ci"][1]
