"""One way to load any gate artifact: the fine-tuned model (format 3) or the logistic baseline (format 2)."""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from classifier.artifact import read_artifact_meta
from classifier.batching import DEFAULT_CACHE_SIZE

if TYPE_CHECKING:
    from classifier.encoder import EncoderPool


class GateClassifier(Protocol):
    """What the proxy and the evaluation need of a loaded classifier."""

    kind: str  # "finetuned" or "logistic"
    threshold_: float | None
    entities_: list[str]

    def score(self, texts: Sequence[str]) -> np.ndarray: ...

    def score_segments(self, segments: Sequence[str], stop_above: float | None = None) -> float: ...


@runtime_checkable
class NamesTerms(Protocol):
    """A classifier whose target vocabulary is a sure sign, read without the encoder (the fine-tuned gate):
    a prompt naming one of its terms scores 1."""

    def named_term(self, segments: Sequence[str]) -> str | None: ...


def artifact_kind(directory: str | Path) -> str:
    return str(read_artifact_meta(directory).get("kind", "logistic"))  # format 2 predates kinds: the logistic head


def load_classifier(directory: str | Path, executor: Executor | None = None, cache_size: int = DEFAULT_CACHE_SIZE,
                    encoders: EncoderPool | None = None) -> GateClassifier:
    """Load an artifact of either kind. Inference runs on `executor` (default: a thread of the classifier's own)
    with an LRU of `cache_size` texts. With `encoders`, its executor and cache size are used instead, and a
    logistic classifier shares the pool's sentence encoder with every other classifier built on it."""
    from classifier.encoder import EncoderPool

    if encoders is not None:
        executor, cache_size = encoders.executor, encoders.cache_size
    kind = artifact_kind(directory)
    if kind == "finetuned":
        from classifier.finetuned import FineTunedClassifier

        return FineTunedClassifier.load(directory, executor=executor, cache_size=cache_size)
    if kind == "logistic":
        from classifier.model import PromptClassifier

        pool = encoders if encoders is not None else EncoderPool(cache_size, executor)
        return PromptClassifier.load(directory, encoder=pool.get(PromptClassifier.artifact_encoder_spec(directory)))
    raise ValueError(f"{Path(directory) / 'classifier.json'}: unknown classifier kind {kind!r}")
