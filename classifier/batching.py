"""Run a model over texts for many threads at once, on one torch thread, batching what is queued.

Many threads may call one runner at once (a server classifies concurrent requests). Their
texts are queued, and a single-thread executor runs everything queued so far in one shared
forward pass; at most one such pass waits in the executor at a time, so other work given to
the same thread never queues behind a backlog of passes. Batching amortises the model's cost,
and keeping torch on one thread matters on a CPU: every thread that runs torch gets an OpenMP
team of its own, and once the teams hold more threads than there are cores, OpenMP stops
spin-waiting and each pass runs about twice as slowly. A server that does other torch work
can hand its runners the executor it uses for that work, so that all of it runs on one
thread. A pass takes at most `pass_chars` characters of text, one text from each waiting caller
in turn, so a caller with a few short texts is served in the next pass even while a caller
with a long document has many windows queued. Subclasses tokenize under `_tokenizer_lock`: a fast tokenizer keeps its padding
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


DEFAULT_PASS_CHARS = 1500  # a few hundred tokens: on one CPU thread a pass stays under about 100 ms
# For the process that classifies on many threads (sys.setswitchinterval): a caller's pure-Python stages
# (readings, vocabulary) hold the GIL, and a torch pass gives it up and takes it back at every operator,
# each time waiting out the holder's switch interval. At CPython's 5 ms a short prompt took 800 ms p50
# beside a stream of 2,000-word prompts (15 ms alone); at 0.1 ms, 73 ms.
GIL_SWITCH_INTERVAL = 0.0001


@dataclass
class _Job:
    texts: list[str]
    progress: bool
    done: threading.Event = field(default_factory=threading.Event)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)  # texts not yet given to a pass
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.waiting = list(self.texts)


class BatchingRunner(ABC):
    """Maps texts to output rows (`forward`), sharing forward passes between concurrent callers."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE, executor: Executor | None = None,
                 thread_name: str = "batching", pass_chars: int = DEFAULT_PASS_CHARS):
        self.cache_size = cache_size
        self.pass_chars = pass_chars
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
        return np.stack([job.rows[text] for text in job.texts])

    def _drain(self) -> None:
        """One pass over a fair share of what is queued; what is left schedules the next pass."""
        with self._jobs_lock:
            batch = self._take_fair_share()
        self._run(batch)
        with self._jobs_lock:
            self._jobs = [job for job in self._jobs if not job.done.is_set()]
            if any(job.waiting for job in self._jobs):
                self._executor.submit(self._drain)
            else:
                self._drain_pending = False

    def _take_fair_share(self) -> dict[str, list[_Job]]:
        """Texts for one pass, one from each waiting job in turn, up to `pass_chars` characters; each text
        with the jobs that wait for it."""
        batch: dict[str, list[_Job]] = {}
        size = 0
        # A job that shows a progress bar is an offline one (training, evaluation): it runs whole.
        budget = float("inf") if any(job.progress for job in self._jobs) else self.pass_chars
        while size < budget:
            took = False
            for job in self._jobs:
                if job.waiting and size < budget:
                    text = job.waiting.pop(0)
                    batch.setdefault(text, []).append(job)
                    size += len(text)
                    took = True
            if not took:
                break
        return batch

    def _run(self, batch: dict[str, list[_Job]]) -> None:
        jobs = {id(job): job for waiting in batch.values() for job in waiting}
        try:
            matrix = self.forward(list(batch), progress=any(job.progress for job in jobs.values()))
        except BaseException as exc:  # each caller raises it
            for job in jobs.values():
                job.error = exc
                job.waiting.clear()
                job.done.set()
            return
        rows = dict(zip(batch, matrix))
        self._remember(rows)
        for text, row in rows.items():
            for job in batch[text]:
                job.rows[text] = row
        for job in jobs.values():
            if not job.waiting and len(job.rows) == len(set(job.texts)):
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
