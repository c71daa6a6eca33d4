"""The real proxy (`eco-proxy serve`) as a subprocess: shared by the integration tests and the
benchmarks, which do not import each other."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx  # the proxy itself is asked, not vLLM

from vllm_client.server import free_port

METRICS_KEY = "test-metrics-key"


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
