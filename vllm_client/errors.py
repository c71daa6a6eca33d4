"""One family of errors for everything that talks to vLLM."""
from __future__ import annotations


class BackendError(RuntimeError):
    """The backend refused or failed a request, or could not be started."""


class BackendUnavailable(BackendError):
    """vLLM could not be reached (refused, reset, timed out, failed mid-response). The message names no
    address: the proxy shows it to clients."""


class BackendRefused(BackendError):
    """vLLM answered, but not with 200: the status and the start of its body."""

    def __init__(self, status: int, text: str, where: str = "the backend"):
        super().__init__(f"{where} answered {status}: {text[:300]}")
        self.status, self.text = status, text


class BackendStartError(BackendError):
    """A vLLM child process could not be started or did not become ready."""
