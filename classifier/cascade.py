"""The cascade's cheap first stage: hashed character and word n-grams into a logistic head.

It reads any script (character n-grams need no tokenizer and no vocabulary), costs well
under a millisecond per piece, and only decides which pieces are worth the encoder: its
threshold is set for very high recall on the forget prompts the encoder flags, so it clears
most benign pieces and passes anything the encoder might catch. Hashing is stateless: the
fitted state is the weight vector and the intercept.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

CHAR_NGRAMS = (2, 5)  # inside word boundaries: names, misspelt names, names inside other languages
WORD_NGRAMS = (1, 2)  # word pairs: "sorting hat", "half blood"


class NgramStage:
    """P(forget) logits from hashed n-grams; follows scikit-learn's estimator contract."""

    def __init__(self, n_features: int = 2**20, C: float = 4.0, random_state: int = 0):
        self.n_features = n_features
        self.C = C
        self.random_state = random_state
        self._vectorizer: Any = None

    def _features(self, pieces: Sequence[str]) -> Any:
        from sklearn.feature_extraction.text import HashingVectorizer

        if self._vectorizer is None:  # stateless, built once for speed
            characters = HashingVectorizer(analyzer="char_wb", ngram_range=CHAR_NGRAMS).build_analyzer()
            words = HashingVectorizer(analyzer="word", ngram_range=WORD_NGRAMS).build_analyzer()

            def ngrams(text: str) -> list[str]:
                # both kinds in one hashed space; the marker keeps the word "owl" apart from "owl" in "howl"
                return characters(text) + ["\0" + gram for gram in words(text)]

            self._vectorizer = HashingVectorizer(analyzer=ngrams, n_features=self.n_features,
                                                 alternate_sign=False, norm="l2")
        return self._vectorizer.transform(pieces)

    def _set_weights(self, coef: np.ndarray, intercept: float) -> None:
        self.coef_ = coef.astype(np.float32)
        self.intercept_ = intercept
        self._coef64 = self.coef_.astype(np.float64)  # converted once: a million weights take a millisecond

    def fit(self, pieces: Sequence[str], labels: Sequence[int], sample_weight: Sequence[float]) -> "NgramStage":
        """Labels 1 forget, 0 retain; weights let a long text count as one example, not as its many pieces."""
        from sklearn.linear_model import LogisticRegression

        head = LogisticRegression(C=self.C, max_iter=3000, random_state=self.random_state)
        head.fit(self._features(pieces), np.asarray(labels), sample_weight=np.asarray(sample_weight))
        self._set_weights(head.coef_[0], float(np.float32(head.intercept_[0])))  # as saved: loaded scores the same
        return self

    def decision(self, pieces: Sequence[str]) -> np.ndarray:
        """The logit of each piece."""
        if len(pieces) == 0:
            return np.zeros(0)
        return self._features(pieces) @ self._coef64 + self.intercept_

    def tensors(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef_, "intercept": np.array([self.intercept_], dtype=np.float32)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, np.ndarray], n_features: int, C: float,
                     random_state: int) -> "NgramStage":
        coef, intercept = tensors.get("coef"), tensors.get("intercept")
        if coef is None or intercept is None or coef.shape != (n_features,) or intercept.shape != (1,):
            raise ValueError(f"the first stage needs coef [{n_features}] and intercept [1]")
        stage = cls(n_features, C, random_state)
        stage._set_weights(coef, float(intercept[0]))
        return stage


def recall_threshold(best_piece_scores: Sequence[float], recall: float) -> float:
    """The highest threshold that keeps at least `recall` of the texts with a piece at or above it,
    given each forget text's best first-stage score."""
    if not 0 < recall <= 1:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    ordered = np.sort(np.asarray(best_piece_scores, dtype=np.float64))
    if ordered.size == 0:
        raise ValueError("the first-stage threshold needs forget calibration texts")
    allowed_misses = math.floor((1 - recall) * ordered.size + 1e-9)
    return float(ordered[allowed_misses])
