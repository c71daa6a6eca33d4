"""Run a model over texts for many threads at once, on one torch thread, batching what is queued.

Many threads may call one runner at once (a server classifies concurrent requests). Their
texts are queued, and a single-thread executor runs everything queued so far in one shared
forward pass; at most one such pass waits in the executor at a time, so other work given to
the same thread never queues behind a backlog of passes. Batching amortises the model's cost,
and keeping torch on one thread matters on a CPU: every thread that runs torch gets an OpenMP
team of its own, and once the teams hold more threads than there are cores, OpenMP stops
spin-waiting and each pass runs about twice as slowly. A server that does other torch work
can hand its runners the executor it uses for that work, so that all of it runs on one
thread. Subclasses tokenize under `_tokenizer_lock`: a fast tokenizer keeps its padding
settings in shared state, and concurrent calls corrupt each other's batches. Recent texts are
remembered (a bounded LRU), so a repeated system prompt or the earlier turns of a
conversation are not run again.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

DEFAULT_CACHE_SIZE = 4096  # texts; an entry is one output row plus its text


@dataclass
class _Job:
    texts: list[str]
    progress: bool
    done: threading.Event = field(default_factory=threading.Event)
    rows: np.ndarray | None = None
    error: BaseException | None = None


class BatchingRunner(ABC):
    """Maps texts to output rows (`forward`), sharing forward passes between concurrent callers."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE, executor: Executor | None = None,
                 thread_name: str = "batching"):
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._jobs: list[_Job] = []
        self._drain_pending = False  # a pass is already waiting in the executor
        self._jobs_lock = threading.Lock()
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix=thread_name)
        self._tokenizer_lock = threading.Lock()

    @property
    @abstractmethod
    def row_shape(self) -> tuple[int, ...]:
        """The shape of one text's output row: () for a score, (dimension,) for an embedding."""

    @abstractmethod
    def forward(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Run the model now on these texts (one row each), bypassing the queue and the cache."""

    def compute(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """One row per text: remembered ones from the cache, the others from a shared forward pass."""
        rows = np.zeros((len(texts), *self.row_shape), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._cache_lock:
            for index, text in enumerate(texts):
                cached = self._cache.get(text)
                if cached is None:
                    missing.setdefault(text, []).append(index)
                else:
                    self._cache.move_to_end(text)
                    rows[index] = cached
        if missing:
            computed = self._compute_shared(list(missing), progress)
            for row, indices in zip(computed, missing.values()):
                rows[indices] = row
        return rows

    def _compute_shared(self, texts: list[str], progress: bool) -> np.ndarray:
        job = _Job(texts, progress)
        with self._jobs_lock:
            self._jobs.append(job)
            schedule, self._drain_pending = not self._drain_pending, True
        if schedule:
            self._executor.submit(self._drain)
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.rows is not None
        return job.rows

    def _drain(self) -> None:
        """Run every job queued so far in one pass; jobs that arrive meanwhile schedule the next drain."""
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
            job.rows = np.stack([rows[text] for text in job.texts])
            job.done.set()

    def _remember(self, rows: dict[str, np.ndarray]) -> None:
        if self.cache_size <= 0:
            return
        with self._cache_lock:
            for text, row in rows.items():
                self._cache[text] = row
                self._cache.move_to_end(text)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
