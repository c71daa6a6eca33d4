"""The serve settings: one schema, and the CLI, the environment and the README's table agree with it."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from proxy.cli import build_parser
from proxy.commands import _HELP, serve_settings
from proxy.policy import PolicyError
from proxy.serve import ServeSettings, _client_keys

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_an_option_and_a_readme_row():
    assert set(_HELP) == set(ServeSettings.model_fields)
    rows = set(re.findall(r"^\| `--([a-z-]+)`", README.read_text(), flags=re.MULTILINE))
    assert {name.replace("_", "-") for name in _HELP} - rows == set(), "options missing from the README's table"


def test_client_keys_from_options_and_environment(monkeypatch):
    parser = build_parser()
    settings = serve_settings(parser.parse_args(["serve", "--api-key", "a", "--api-key", "b"]))
    assert settings.api_key == ["a", "b"]
    monkeypatch.setenv("ECO_API_KEY", "x, y,")
    assert serve_settings(parser.parse_args(["serve"])).api_key == ["x", "y"]
    monkeypatch.setenv("ECO_CLASSIFY_TIMEOUT", "2.5")
    assert serve_settings(parser.parse_args(["serve"])).classify_timeout == 2.5


def test_client_keys_from_a_file_and_an_empty_file_refused(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# clients\nfirst\n\n  second  \n")
    settings = serve_settings(build_parser().parse_args(["serve", "--api-key", "a", "--api-key-file", str(keys)]))
    assert _client_keys(settings) == ("a", "first", "second")
    keys.write_text("# no key yet\n\n")
    with pytest.raises(PolicyError, match="holds no key"):
        _client_keys(settings)


def test_cpus_read_as_taskset_names_them_and_refused_when_unavailable(monkeypatch, capsys):
    from proxy.commands import _serve

    parser = build_parser()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 6})
    assert serve_settings(parser.parse_args(["serve", "--cpus", "2-3,6,3"])).cpus == [2, 3, 6]
    monkeypatch.setenv("ECO_CPUS", "1")
    assert serve_settings(parser.parse_args(["serve"])).cpus == [1]
    assert _serve(parser.parse_args(["serve", "--cpus", "5"])) == 2
    assert "eco-proxy serve: --cpus / ECO_CPUS: CPU 5 is not available to this process (available: 0, 1, 2, 3, 6)" \
        in capsys.readouterr().err
    assert _serve(parser.parse_args(["serve", "--cpus", "one"])) == 2
    assert "is not a CPU list such as 1 or 2-3,6" in capsys.readouterr().err


def test_the_proxy_moves_every_thread_of_its_own_to_the_cpus_given():
    """In a child process (the affinity is the whole process's): a thread started before the call moves too."""
    import subprocess
    import sys

    script = """
import os, threading
from proxy.serve import _run_on
event = threading.Event()
threading.Thread(target=event.wait, daemon=True).start()
first = min(os.sched_getaffinity(0))
_run_on([first])
print(sorted({frozenset(os.sched_getaffinity(int(t))) == {first} for t in os.listdir('/proc/self/task')}))
event.set()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[True]"
