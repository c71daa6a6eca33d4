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
