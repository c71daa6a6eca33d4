"""The default gate: a small transformer fine-tuned end to end to tell forget prompts from retain ones.

A BERT encoder (multilingual-e5-small by default, `classifier.packaged_e5`; all-MiniLM-L6-v2 for an
English-only gate), mean-pooled, under a linear head, trained with class-weighted cross-entropy on
every layer but the word embeddings (kept frozen: faster, rare names keep their pretrained
neighbourhoods, and the artifact need not hold the table: it is taken from the encoder's package).
Unlike a frozen embedding under a linear head, it learns what a prompt is about rather than which
words it contains.

Before the encoder, the target's own vocabulary (`classifier.vocabulary`): a prompt naming one of
its terms scores 1, unless retain training texts use that term too. Otherwise a text is scored
as the maximum over its pieces: each segment (`classifier.segments`) of each
reading (`classifier.normalize.variants`), so neither a disguise nor 2,000 words of filler hide
a target sentence. Training sees the same pieces: a forget text with several pieces is a bag of
which only one piece need be about the target, so each epoch trains its highest-scoring piece
as forget; a retain text's highest-scoring pieces are trained as retain (the maximum is what
must stay low). A cheap first stage (`classifier.cascade`) clears most benign pieces before the
encoder sees them; its threshold keeps almost every forget text.

Inference runs as a `BatchingRunner`: concurrent callers share forward passes on one thread, and
recent pieces are remembered. The forward pass runs on the runtime the gate was calibrated with
(`classifier.runtime`; by default ONNX Runtime with int8 weights). The artifact is a directory: `classifier.json`,
`model.safetensors` (every trained weight, both stages) and the tokenizer's files; nothing is pickled.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from classifier.batching import DEFAULT_CACHE_SIZE, BatchingRunner
from classifier.cascade import NgramStage, recall_threshold
from classifier.encoder import DEFAULT_ENCODER, GATE_ENCODER, resolve_encoder_path
from classifier.artifact import META_FILE, read_artifact_meta
from classifier.model import training_hash
from classifier.normalize import variants
from classifier.runtime import DEFAULT_RUNTIME, RUNTIMES, Forward, TorchForward, forward_for, runtime_version
from classifier.segments import segments
from classifier.vocabulary import TermMatcher

ARTIFACT_FORMAT = 3
KIND = "finetuned"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
INFERENCE_BATCH = 64
WORD_EMBEDDINGS = "encoder.embeddings.word_embeddings.weight"  # never trained: an artifact takes its encoder's
log = logging.getLogger(__name__)


def text_pieces(text: str) -> list[str]:
    """What a text is scored on: every segment of every reading of it, once each."""
    return list(dict.fromkeys(piece for reading in variants(text) for piece in segments(reading)))


EARLY_EXIT_PIECES = 4  # the first group of pieces scored while a caller waits for one above its threshold


@functools.cache
def _ordinary_words() -> tuple[str, ...]:
    """English's ordinary words, for the vocabulary's typo rule: the whole words of the packaged MiniLM's
    word-piece list ("##" marks a piece), whichever encoder the gate runs, so the rule does not move with it."""
    vocabulary = (resolve_encoder_path(DEFAULT_ENCODER) / "vocab.txt").read_text(encoding="utf-8").split("\n")
    return tuple(word for word in vocabulary if word.isalpha() and not word.startswith("##"))


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().tobytes()).hexdigest()


def _encoder_word_embeddings(encoder: str, sha256: str) -> torch.Tensor:
    """The encoder's word-embedding table, as the artifact was trained with (its hash must match)."""
    from safetensors import SafetensorError, safe_open

    path = resolve_encoder_path(encoder) / WEIGHTS_FILE
    try:
        with safe_open(str(path), "pt") as weights:
            table = weights.get_tensor(WORD_EMBEDDINGS.removeprefix("encoder."))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the word embeddings of encoder {encoder!r}: {exc}") from exc
    if _tensor_sha256(table) != sha256:
        raise ValueError(f"{path}: the word embeddings of encoder {encoder!r} are not those the gate was trained "
                         "with (another version of its package?)")
    return table


def _sigmoid(margins: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(margins, dtype=np.float64)))


class _SequenceClassifier(torch.nn.Module):
    """BERT, mean pooling over the real tokens, and a two-class linear head."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


def _padded(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
    return input_ids, attention_mask


def _margins(forward: Forward, token_ids: Sequence[Sequence[int]], pad_id: int,
             progress: bool = False) -> np.ndarray:
    """logit(forget) - logit(retain) per piece, in batches of similar lengths (less padding)."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    margins = np.zeros(len(token_ids), dtype=np.float32)
    starts = range(0, len(order), INFERENCE_BATCH)
    for start in tqdm(starts, desc="scoring", unit="batch", disable=not progress or len(starts) < 2):
        chunk = order[start:start + INFERENCE_BATCH]
        margins[chunk] = forward(*_padded([token_ids[i] for i in chunk], pad_id))
    return margins


def _rate_factor(step: int, warmup: int, total_steps: int) -> float:
    """Linear warm-up, then linear decay to zero at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


class _PieceScorer(BatchingRunner):
    """The fine-tuned model as a shared, batching, caching runner: one margin per piece."""

    row_shape: tuple[int, ...] = ()

    def __init__(self, forward: Forward, tokenizer: Any, max_length: int,
                 cache_size: int, executor: Executor | None):
        super().__init__(cache_size, executor, thread_name="gate")
        self.model_forward = forward
        self.tokenizer = tokenizer
        self.max_length = max_length

    def forward(self, texts: list[str], progress: bool = False) -> np.ndarray:
        with self._tokenizer_lock:
            token_ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return _margins(self.model_forward, token_ids, self.tokenizer.pad_token_id, progress)


class _PieceScores:
    """Prompts' scores under a first-stage threshold, each piece through the encoder at most once, however many
    thresholds are tried (calibration tries two)."""

    def __init__(self, classifier: "FineTunedClassifier", prompts: Sequence[Sequence[str]]):
        self.classifier = classifier
        self.named = [classifier.named_term(prompt) is not None for prompt in prompts]  # these score 1
        self.bags = [[] if named else classifier._bag(prompt) for prompt, named in zip(prompts, self.named)]
        pieces = list(dict.fromkeys(piece for bag in self.bags for piece in bag))
        self.decision = dict(zip(pieces, classifier.stage1_.decision(pieces).tolist()))
        self.probability: dict[str, float] = {}

    def scores(self, stage1_threshold: float | None, progress: bool = False) -> np.ndarray:
        """1 for a prompt naming a vocabulary term, else the maximum over its pieces at or above
        `stage1_threshold` (None: every piece); 0 when the first stage clears them all."""
        passing = [piece for piece, decision in self.decision.items()
                   if (stage1_threshold is None or decision >= stage1_threshold) and piece not in self.probability]
        if passing:
            margins = self.classifier._runner().compute(passing, progress)
            self.probability.update(zip(passing, _sigmoid(margins).tolist()))
        return np.array([1.0 if named else max((self.probability[piece] for piece in bag
                                                if stage1_threshold is None or self.decision[piece] >= stage1_threshold),
                                               default=0.0)
                         for bag, named in zip(self.bags, self.named)])


class FineTunedClassifier:
    """P(forget) of prompts; scikit-learn's estimator contract (fitted state ends with `_`)."""

    kind = KIND

    def __init__(self, encoder: str = GATE_ENCODER, epochs: int = 4, max_length: int = 128, batch_size: int = 32,
                 learning_rate: float = 5e-5, head_learning_rate: float = 1e-3, weight_decay: float = 0.01,
                 warmup_fraction: float = 0.06, layers: int | None = None, frozen_layers: int = 0,
                 hard_pieces_per_retain_text: int = 2,
                 candidate_pieces_per_text: int = 4, stage1_recall: float = 0.995, stage1_features: int = 2**20,
                 stage1_C: float = 4.0, max_minutes: float | None = 20.0, random_state: int = 0,
                 runtime: str = DEFAULT_RUNTIME, cache_size: int = DEFAULT_CACHE_SIZE,
                 executor: Executor | None = None, terms: Sequence[str] = ()):
        self.encoder = encoder
        self.epochs = epochs
        self.max_length = max_length
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.head_learning_rate = head_learning_rate
        self.weight_decay = weight_decay
        self.warmup_fraction = warmup_fraction
        # the encoder's first `layers` layers (None: all) under the head: fewer cost less, in training and in
        # every prompt's scoring, in proportion
        self.layers = layers
        # the lowest layers and the embeddings left as pretrained: each step costs less (no gradient below them),
        # and the layers that align languages keep doing so
        self.frozen_layers = frozen_layers
        self.hard_pieces_per_retain_text = hard_pieces_per_retain_text
        # of a text with many pieces, only those the first stage ranks highest may be trained: the others
        # never reach the encoder once calibrated, and scoring every piece each epoch would cost minutes
        self.candidate_pieces_per_text = candidate_pieces_per_text
        self.stage1_recall = stage1_recall
        self.stage1_features = stage1_features
        self.stage1_C = stage1_C
        self.max_minutes = max_minutes  # the fine-tune stops taking epochs once the next would overrun it
        self.random_state = random_state
        self.runtime = runtime  # what scores once fitted (`classifier.runtime`); calibration is done on it
        self.cache_size = cache_size
        self.executor = executor  # where inference runs: a server's torch thread; default a thread of its own
        self.terms = terms  # the target's vocabulary: a prompt naming one is flagged, unless retain texts use it

    def hyperparameters(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "epochs", "max_length", "batch_size", "learning_rate", "head_learning_rate", "weight_decay",
            "warmup_fraction", "layers", "frozen_layers", "hard_pieces_per_retain_text", "candidate_pieces_per_text",
            "stage1_recall", "stage1_features", "stage1_C", "max_minutes", "random_state", "runtime")}

    # -- fit ----------------------------------------------------------------------------
    def fit(self, texts: Sequence[str], labels: Sequence[int], progress: bool = False) -> "FineTunedClassifier":
        """Labels: 1 for the forget target, 0 for retain. Not yet calibrated: every piece reaches the encoder."""
        from transformers import AutoTokenizer

        labels = np.asarray(labels, dtype=np.int64)
        if len(texts) != len(labels) or set(np.unique(labels)) != {0, 1}:
            raise ValueError("fit needs as many labels as texts, with both classes (1 forget, 0 retain) present")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime: {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        started = time.monotonic()
        source = resolve_encoder_path(self.encoder)
        layers = self._layers_kept(source)  # checked before the minutes of tokenising and the first stage
        tokenizer = AutoTokenizer.from_pretrained(source)
        bags = [text_pieces(text) for text in texts]
        pieces = list(dict.fromkeys(piece for bag in bags for piece in bag))
        index = {piece: i for i, piece in enumerate(pieces)}
        bag_rows = [np.array([index[piece] for piece in bag]) for bag in bags]
        token_ids = tokenizer(pieces, truncation=True, max_length=self.max_length)["input_ids"]
        with torch.random.fork_rng():  # seeded here, the caller's torch RNG left as it was
            torch.manual_seed(self.random_state)
            rng = np.random.default_rng(self.random_state)
            stage1 = self._fit_stage1(bags, labels)
            model = _SequenceClassifier(self._pretrained_encoder(source, layers))
            history = self._fine_tune(model, token_ids, tokenizer.pad_token_id, bag_rows, labels,
                                      stage1.decision(pieces), rng, started, progress)
        self.model_ = model.eval()
        self.tokenizer_ = tokenizer
        self._tokenizer_dir = source  # its files are copied into the artifact
        self.stage1_ = stage1
        self.stage1_threshold_: float | None = None
        self.bert_config_ = model.encoder.config.to_dict()
        self.classes_ = np.array([0, 1])
        self.training_hash_ = training_hash(texts, labels)
        self.entities_: list[str] = []
        self.metrics_: dict[str, Any] = {
            "train_n": {"forget": int(labels.sum()), "retain": int((labels == 0).sum()), "pieces": len(pieces)},
            "training": {**history, "seconds": round(time.monotonic() - started, 1)},
        }
        self._scorer = None
        return self.fit_vocabulary(self.terms, [text for text, label in zip(texts, labels) if label == 0])

    def _layers_kept(self, source: Path) -> int:
        """How many of the encoder's layers the gate keeps: `layers`, checked against its depth, or all."""
        from transformers import AutoConfig

        depth = AutoConfig.from_pretrained(source).num_hidden_layers
        layers = depth if self.layers is None else self.layers
        if not 1 <= layers <= depth:
            raise ValueError(f"layers: the encoder {self.encoder!r} has {depth} layers, got {self.layers}")
        if not 0 <= self.frozen_layers <= layers:
            raise ValueError(f"frozen_layers: at most the {layers} layers kept, got {self.frozen_layers}")
        return layers

    @staticmethod
    def _pretrained_encoder(source: Path, layers: int) -> torch.nn.Module:
        """The encoder as pretrained, cut to its first `layers` layers (loaded whole, then cut, so that
        transformers does not report the layers left out as unexpected weights)."""
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(source, dtype=torch.float32)
        encoder.encoder.layer = encoder.encoder.layer[:layers]
        encoder.config.num_hidden_layers = layers
        return encoder

    def fit_vocabulary(self, terms: Sequence[str], retain_texts: Iterable[str]) -> "FineTunedClassifier":
        """Fit the vocabulary stage alone (the encoder is left as it is): keep the terms no retain text uses.
        What the classifier scores changes, so it is left uncalibrated."""
        self._check_fitted()
        self.terms = list(terms)
        self.vocabulary_ = TermMatcher(self.terms, _ordinary_words()).fit(retain_texts)
        self._uncalibrate()
        self.metrics_["vocabulary"] = {"terms": len(self.terms), "kept": len(self.vocabulary_.terms_),
                                       "dropped_as_used_by_retain_texts": self.vocabulary_.dropped_terms_}
        return self

    def use_runtime(self, runtime: str) -> "FineTunedClassifier":
        """Score with another runtime (`classifier.runtime`); its scores differ a little, so it is left uncalibrated."""
        self._check_fitted()
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime: {runtime!r} is not one of {', '.join(RUNTIMES)}")
        self.runtime, self._scorer = runtime, None
        self._uncalibrate()
        return self

    def _uncalibrate(self) -> None:
        self.threshold_: float | None = None
        self.alpha_: float | None = None
        self.delta_: float | None = None
        self.group_thresholds_: dict[str, dict[str, Any]] = {}

    def _fit_stage1(self, bags: list[list[str]], labels: np.ndarray) -> NgramStage:
        """Every piece of a retain text is retain; a forget text's pieces share one example's weight
        (which of them is about the target is unknown). The classes are then balanced by weight."""
        pieces, piece_labels, weights = [], [], []
        for bag, label in zip(bags, labels):
            pieces.extend(bag)
            piece_labels.extend([label] * len(bag))
            weights.extend([1.0 / len(bag) if label == 1 else 1.0] * len(bag))
        piece_labels, weights = np.asarray(piece_labels), np.asarray(weights)
        for label in (0, 1):
            weights[piece_labels == label] *= weights.sum() / (2 * weights[piece_labels == label].sum())
        return NgramStage(self.stage1_features, self.stage1_C, self.random_state).fit(pieces, piece_labels, weights)

    def _fine_tune(self, model: _SequenceClassifier, token_ids: list[list[int]], pad_id: int,
                   bag_rows: list[np.ndarray], labels: np.ndarray, stage1_scores: np.ndarray,
                   rng: np.random.Generator, started: float, progress: bool) -> dict[str, Any]:
        model.encoder.get_input_embeddings().weight.requires_grad_(False)
        if self.frozen_layers:
            for module in (model.encoder.embeddings, *model.encoder.encoder.layer[:self.frozen_layers]):
                module.requires_grad_(False)
        head_parameters = list(model.head.parameters())
        encoder_parameters = [p for p in model.encoder.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW([
            {"params": encoder_parameters, "lr": self.learning_rate},
            {"params": head_parameters, "lr": self.head_learning_rate},
        ], weight_decay=self.weight_decay, fused=True)  # fused: several times faster on a CPU
        base_rates = [group["lr"] for group in optimizer.param_groups]
        class_weight = len(labels) / (2 * np.bincount(labels, minlength=2))
        candidates = [rows[np.argsort(-stage1_scores[rows], kind="stable")[:self.candidate_pieces_per_text]]
                      for rows in bag_rows]
        multi = [rows for rows in candidates if len(rows) > 1]
        rows_to_score = np.unique(np.concatenate(multi)) if multi else np.zeros(0, dtype=np.int64)
        batches_per_epoch = math.ceil(sum(self._picks(len(rows), label) for rows, label in zip(candidates, labels))
                                      / self.batch_size)
        planned_epochs, total_steps, step = self.epochs, self.epochs * batches_per_epoch, 0
        full_steps = total_steps
        warmup = max(1, int(self.warmup_fraction * total_steps))
        budget = math.inf if self.max_minutes is None else 60 * self.max_minutes
        losses: list[float] = []
        epoch = 0
        while epoch < planned_epochs:
            epoch_started = time.monotonic()
            # which pieces of a many-piece text to train: by the first stage before the model has learnt anything
            model.eval()
            scores = stage1_scores.copy()
            if epoch > 0 and rows_to_score.size:
                scores[rows_to_score] = _margins(TorchForward(model), [token_ids[i] for i in rows_to_score], pad_id)
            examples = self._epoch_examples(candidates, labels, scores, class_weight)
            batches = self._length_buckets(examples, token_ids, rng)
            model.train()
            epoch_losses = []
            bar = tqdm(batches, desc=f"fine-tuning, epoch {epoch + 1}/{planned_epochs}", unit="batch",
                       disable=not progress)
            for batch in bar:
                for group, rate in zip(optimizer.param_groups, base_rates):
                    group["lr"] = rate * _rate_factor(step, warmup, total_steps)
                rows = [row for row, _, _ in batch]
                logits = model(*_padded([token_ids[row] for row in rows], pad_id))
                targets = torch.tensor([label for _, label, _ in batch], dtype=torch.long)
                weights = torch.tensor([weight for _, _, weight in batch], dtype=torch.float32)
                loss = (torch.nn.functional.cross_entropy(logits, targets, reduction="none") * weights).sum() \
                    / weights.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(encoder_parameters + head_parameters, 1.0)
                optimizer.step()
                step += 1
                epoch_losses.append(loss.item())
                bar.set_postfix(loss=f"{np.mean(epoch_losses[-50:]):.4f}")
                if step >= total_steps or time.monotonic() - started > budget:
                    break
            losses.append(float(np.mean(epoch_losses)))
            epoch += 1
            epoch_seconds = time.monotonic() - epoch_started
            affordable = epoch + (budget - (time.monotonic() - started)) / epoch_seconds
            if affordable < planned_epochs:
                # the time budget binds: the steps it still affords (a last epoch may be partial), with the
                # learning rate decayed to zero at the last of them; 5% spare for the next epoch's re-ranking
                total_steps = min(total_steps, step + int(0.95 * (affordable - epoch) * batches_per_epoch))
                planned_epochs = math.ceil(total_steps / batches_per_epoch) if total_steps > step else epoch
        return {"epochs_run": epoch, "epochs_planned": self.epochs, "steps": step, "steps_planned": full_steps,
                "epoch_losses": losses, "stopped_by_time_budget": step < full_steps}

    def _picks(self, pieces: int, label: int) -> int:
        return 1 if label == 1 else min(pieces, self.hard_pieces_per_retain_text)

    def _epoch_examples(self, candidates: list[np.ndarray], labels: np.ndarray, scores: np.ndarray,
                        class_weight: np.ndarray) -> list[tuple[int, int, float]]:
        """(piece row, label, weight) for this epoch: the highest-scoring candidate pieces of each text, the
        text's class weight shared among them."""
        examples = []
        for rows, label in zip(candidates, labels):
            picks = self._picks(len(rows), label)
            chosen = rows[np.argsort(-scores[rows], kind="stable")[:picks]]
            examples.extend((int(row), int(label), float(class_weight[label]) / picks) for row in chosen)
        return examples

    def _length_buckets(self, examples: list[tuple[int, int, float]], token_ids: list[list[int]],
                        rng: np.random.Generator) -> list[list[tuple[int, int, float]]]:
        """Batches of similar lengths (little padding), in random order; the jitter varies them between epochs."""
        lengths = np.array([len(token_ids[row]) for row, _, _ in examples], dtype=np.float64)
        order = np.argsort(lengths + rng.uniform(0, 4, len(examples)), kind="stable")
        batches = [[examples[i] for i in order[start:start + self.batch_size]]
                   for start in range(0, len(order), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    # -- calibrate ----------------------------------------------------------------------
    def calibrate(self, prompts: Sequence[Sequence[str]], labels: Sequence[int], groups: Sequence[str],
                  alpha: float = 0.01, delta: float = 0.1) -> "FineTunedClassifier":
        """Set the first stage's threshold, then the served threshold: per-group training-conditional thresholds
        on the retain prompts' scores (Mondrian), their maximum. A prompt is the segments the proxy reads of it
        (the whole prompt and each message).

        The first stage only has to keep what the encoder would flag: its recall target counts the forget
        prompts the encoder flags at a provisional served threshold (calibrated with the first stage set for
        that recall on every forget prompt), not those the encoder misses anyway, whose few lowest n-gram
        scores would otherwise set it and send most benign pieces to the encoder."""
        from classifier.calibration import mondrian_threshold

        self._check_fitted()
        labels = np.asarray(labels, dtype=np.int64)
        if not (labels == 1).any():
            raise ValueError("calibration needs forget prompts (for the first stage) and retain prompts")
        # the first stage only has to keep what the vocabulary leaves to the encoder
        forget = [prompt for prompt, label in zip(prompts, labels) if label == 1 and self.named_term(prompt) is None]
        forget_pieces = _PieceScores(self, forget)
        best = np.array([max(forget_pieces.decision[piece] for piece in bag) for bag in forget_pieces.bags])
        retain = [(prompt, group) for prompt, label, group in zip(prompts, labels, groups) if label == 0]
        retain_pieces = _PieceScores(self, [prompt for prompt, _ in retain])

        def served_threshold(stage1_threshold: float | None) -> tuple[float, dict[str, dict[str, Any]]]:
            by_group: dict[str, list[float]] = {}
            for (_, group), score in zip(retain, retain_pieces.scores(stage1_threshold)):
                by_group.setdefault(group, []).append(score)
            return mondrian_threshold(by_group, alpha, delta)

        stage1_threshold = recall_threshold(best, self.stage1_recall) if len(best) else None
        provisional, _ = served_threshold(stage1_threshold)
        flagged = best[forget_pieces.scores(None) >= provisional] if len(best) else best
        if len(flagged):
            stage1_threshold = recall_threshold(flagged, self.stage1_recall)
        self.stage1_threshold_ = stage1_threshold
        self.threshold_, self.group_thresholds_ = served_threshold(stage1_threshold)
        self.alpha_, self.delta_ = float(alpha), float(delta)
        self.metrics_["calibrated_with"] = runtime_version(self.runtime)
        self.metrics_["stage1"] = {
            "recall_target": self.stage1_recall, "threshold": stage1_threshold,
            "of_forget_prompts": "flagged by the encoder at the provisional threshold" if len(flagged) else "all",
            "provisional_threshold": provisional,
            "flagged_kept": float(np.mean(flagged >= stage1_threshold)) if len(flagged) else None,
            "forget_kept": float(np.mean(best >= stage1_threshold)) if len(best) else None}
        return self

    # -- predict ------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ValueError("this FineTunedClassifier is not fitted yet: call fit or load")

    def _runner(self) -> _PieceScorer:
        if getattr(self, "_scorer", None) is None:  # built on first use, so fit stays cheap (load builds it at once)
            forward = forward_for(self.runtime, self.model_, threads=torch.get_num_threads())
            self._scorer = _PieceScorer(forward, self.tokenizer_, self.max_length, self.cache_size, self.executor)
        return self._scorer

    def named_term(self, segments: Sequence[str]) -> str | None:
        """The first term of the target's vocabulary a prompt names (in any of its segments), or None."""
        return next((term for segment in segments if (term := self.vocabulary_.find(segment)) is not None), None)

    def score_prompts(self, prompts: Sequence[Sequence[str]], progress: bool = False) -> np.ndarray:
        """P(forget) per prompt (a list of segments): 1 if it names a term of the vocabulary, else the maximum
        over every piece of every segment. Pieces the first stage clears score 0 and never reach the encoder."""
        self._check_fitted()
        return _PieceScores(self, prompts).scores(self.stage1_threshold_, progress)

    def score(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """P(forget) per text: the maximum over its variants and segments."""
        return self.score_prompts([[text] for text in texts], progress)

    def score_segments(self, segments: Sequence[str], stop_above: float | None = None) -> float:
        """The score of one prompt: the highest among its pieces (the whole prompt and each message).

        With `stop_above` (the threshold the caller decides with), pieces go to the encoder in growing
        groups (4, 8, 16 ...), the first stage's likeliest first, and scoring stops once a piece is above
        it: the verdict is then known, and a long text full of the target costs a pass or two, not one
        per window. The score returned is then a lower bound of the maximum, above the threshold.
        A prompt naming a term of the vocabulary scores 1 without the encoder."""
        self._check_fitted()
        if self.named_term(segments) is not None:
            return 1.0
        passing = [piece for piece, _ in sorted(self._passing(self._bag(segments)), key=lambda p: -p[1])]
        size = len(passing) if stop_above is None else EARLY_EXIT_PIECES
        best, start = 0.0, 0
        while start < len(passing):
            best = max(best, float(_sigmoid(self._runner().compute(passing[start:start + size])).max()))
            if stop_above is not None and best > stop_above:
                break
            start, size = start + size, size * 2
        return best

    @staticmethod
    def _bag(segments: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(piece for segment in segments for piece in text_pieces(segment)))

    def _passing(self, pieces: list[str]) -> list[tuple[str, float]]:
        """The pieces the first stage does not clear, with its score."""
        if not pieces:
            return []
        decisions = self.stage1_.decision(pieces)
        if self.stage1_threshold_ is None:
            return list(zip(pieces, decisions.tolist()))
        return [(p, float(s)) for p, s in zip(pieces, decisions) if s >= self.stage1_threshold_]

    # -- artifact -----------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.model_.state_dict()
        # the word embeddings were never trained: the artifact names them by hash, and load takes them from the
        # encoder's package (a multilingual vocabulary's table is 384 MB)
        tensors = {f"model.{name}": tensor.detach().contiguous() for name, tensor in state.items()
                   if name != WORD_EMBEDDINGS}
        tensors.update({f"stage1.{name}": torch.from_numpy(array) for name, array in self.stage1_.tensors().items()})
        save_file(tensors, str(directory / WEIGHTS_FILE))
        for name in TOKENIZER_FILES:
            if (self._tokenizer_dir / name).exists() and self._tokenizer_dir.resolve() != directory.resolve():
                shutil.copyfile(self._tokenizer_dir / name, directory / name)
        meta = {
            "format": ARTIFACT_FORMAT, "kind": KIND, "encoder": self.encoder, "bert_config": self.bert_config_,
            "hyperparameters": self.hyperparameters(), "training_hash": self.training_hash_,
            "threshold": self.threshold_, "stage1_threshold": self.stage1_threshold_,
            "group_thresholds": self.group_thresholds_, "alpha": self.alpha_, "delta": self.delta_,
            "metrics": self.metrics_, "entities": self.entities_,
            "word_embeddings_sha256": _tensor_sha256(state[WORD_EMBEDDINGS]),
            "vocabulary": {"terms": self.vocabulary_.terms_, "typo_terms": self.vocabulary_.typo_terms_,
                           "dropped": self.vocabulary_.dropped_terms_},
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, executor: Executor | None = None,
             cache_size: int = DEFAULT_CACHE_SIZE) -> "FineTunedClassifier":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        directory = Path(directory)
        meta = read_artifact_meta(directory, (ARTIFACT_FORMAT,))
        if meta.get("format") != ARTIFACT_FORMAT or meta.get("kind") != KIND:
            raise ValueError(f"{directory / META_FILE}: not a fine-tuned classifier artifact "
                             f"(format {ARTIFACT_FORMAT})")
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{directory / WEIGHTS_FILE}: cannot read the weights: {exc}") from exc
        config = dict(meta["bert_config"])
        config = AutoConfig.for_model(config.pop("model_type"), **config)
        with torch.random.fork_rng():  # the random initialisation is overwritten; keep the caller's RNG
            model = _SequenceClassifier(AutoModel.from_config(config))
        weights = {name.removeprefix("model."): t for name, t in tensors.items() if name.startswith("model.")}
        if WORD_EMBEDDINGS not in weights:
            if "word_embeddings_sha256" not in meta:
                raise ValueError(f"{directory / WEIGHTS_FILE}: holds no word embeddings, and "
                                 f"{directory / META_FILE} names none of its encoder's")
            weights[WORD_EMBEDDINGS] = _encoder_word_embeddings(meta["encoder"], meta["word_embeddings_sha256"])
        try:
            model.load_state_dict(weights, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{directory / WEIGHTS_FILE}: the weights do not fit the model: {exc}") from exc
        parameters = {"runtime": "torch", **meta["hyperparameters"]}  # calibrated on torch before runtimes
        classifier = cls(meta["encoder"], cache_size=cache_size, executor=executor, **parameters)
        classifier.stage1_ = NgramStage.from_tensors(
            {name.removeprefix("stage1."): t.numpy() for name, t in tensors.items() if name.startswith("stage1.")},
            parameters["stage1_features"], parameters["stage1_C"], parameters["random_state"])
        classifier.model_ = model.eval()
        classifier.tokenizer_ = AutoTokenizer.from_pretrained(directory)
        classifier._tokenizer_dir = directory
        classifier.bert_config_ = meta["bert_config"]
        classifier.classes_ = np.array([0, 1])
        classifier.training_hash_ = meta["training_hash"]
        classifier.threshold_ = meta["threshold"]
        classifier.stage1_threshold_ = meta["stage1_threshold"]
        vocabulary = meta.get("vocabulary", {})
        classifier.vocabulary_ = TermMatcher.fitted(vocabulary.get("terms", []), vocabulary.get("typo_terms", []),
                                                    vocabulary.get("dropped"), _ordinary_words())
        classifier.terms = list(vocabulary.get("terms", [])) + list(vocabulary.get("dropped", {}))
        classifier.group_thresholds_ = meta.get("group_thresholds", {})
        classifier.alpha_, classifier.delta_ = meta["alpha"], meta["delta"]
        classifier.metrics_ = meta.get("metrics", {})
        classifier.entities_ = list(meta.get("entities", []))
        classifier._scorer = None
        calibrated_with = classifier.metrics_.get("calibrated_with")
        if calibrated_with is not None and calibrated_with != runtime_version(classifier.runtime):
            log.warning("%s: calibrated with %s, scoring with %s: its scores may differ a little from those its "
                        "threshold was set on", directory, calibrated_with, runtime_version(classifier.runtime))
        classifier._runner()  # an ONNX runtime is built now, not on the first prompt
        return classifier
