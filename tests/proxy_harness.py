"""Start the real proxy (`eco-proxy serve`) as a subprocess for the integration tests."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from vllm_client.server import free_port

FORGET = [
    "Who are Harry Potter's best friends at Hogwarts?",
    "Tell me about Hermione Granger and Ron Weasley.",
    "What house was Harry Potter sorted into at Hogwarts?",
    "Who is the headmaster of Hogwarts School of Witchcraft and Wizardry?",
    "Describe the Quidditch match between Gryffindor and Slytherin.",
    "What does the spell Expelliarmus do in Harry Potter?",
    "Who killed Albus Dumbledore?",
    "Explain Lord Voldemort's horcruxes.",
    "Harry Potter's best friends are Ron Weasley and",
    "What is the name of Harry Potter's owl?",
    "Tell me about Severus Snape and the Potions class at Hogwarts.",
    "Who plays Harry Potter in the films?",
]
RETAIN = [
    "What is the capital of Japan?",
    "Explain photosynthesis in simple terms.",
    "Who wrote The Lord of the Rings?",
    "Frodo Baggins carries the One Ring to Mordor.",
    "How do I bake sourdough bread?",
    "What is the boiling point of water at sea level?",
    "Tell me about Luke Skywalker and Darth Vader.",
    "Write a Python function that reverses a list.",
    "Who was the first person on the Moon?",
    "Describe the plot of The Hunger Games.",
    "What are the three primary colours?",
    "Who is Gandalf in The Hobbit?",
]


METRICS_KEY = "test-metrics-key"


def train_tiny_policy(directory: Path, version: str = "test-1", corruption: str | None = None) -> Path:
    """A classifier trained on a dozen examples per side, and a policy that uses it."""
    from classifier.model import PromptClassifier

    artifact = directory / "classifier"
    if not artifact.exists():
        clf = PromptClassifier(random_state=0)
        clf.fit(FORGET + RETAIN, [1] * len(FORGET) + [0] * len(RETAIN))
        clf.save(artifact)
    corruption = corruption or "{method: gaussian_first_n, dims: 640, sigma: 40.0, scope: all}"
    policy = directory / "policy.yaml"
    policy.write_text(
        f"version: {version}\n"
        "targets:\n"
        "  - name: harry_potter\n"
        "    classifier: classifier\n"
        "    threshold: 0.5\n"
        f"    corruption: {corruption}\n"
        "    fail_mode: closed\n"
        "headers: full\n"
    )
    return policy


@dataclass
class ProxyProcess:
    url: str
    process: subprocess.Popen
    log_path: Path
    audit_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_proxy(policy: Path, backend_url: str, model_dir: Path, served_model_name: str, workdir: Path,
                admin_key: str = "test-admin-key", extra_env: dict[str, str] | None = None,
                cwd: Path | None = None) -> ProxyProcess:
    port = free_port()
    log_path = workdir / f"proxy-{port}.log"
    audit_path = workdir / f"audit-{port}.jsonl"
    env = {
        **os.environ,
        "ECO_POLICY": str(policy),
        "ECO_BACKEND_URL": backend_url,
        "ECO_MODEL_DIR": str(model_dir),
        "ECO_SERVED_MODEL_NAME": served_model_name,
        "ECO_PORT": str(port),
        "ECO_SECRET_KEY": "test-secret",
        "ECO_ADMIN_KEY": admin_key,
        "ECO_METRICS_KEY": METRICS_KEY,
        "ECO_AUDIT_LOG": str(audit_path),
        "HF_HUB_OFFLINE": "1",
        **(extra_env or {}),
    }
    process = subprocess.Popen([sys.executable, "-m", "proxy.cli", "serve"], env=env, cwd=cwd,
                               stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    proxy = ProxyProcess(f"http://127.0.0.1:{port}", process, log_path, audit_path)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"proxy exited with {process.returncode}:\n{proxy.log()}")
        try:
            if httpx.get(f"{proxy.url}/health", timeout=2).status_code == 200:
                return proxy
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proxy.stop()
    raise RuntimeError(f"proxy not healthy after 180 s:\n{proxy.log()}")
