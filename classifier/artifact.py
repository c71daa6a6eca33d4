"""A classifier artifact's description file, classifier.json, read the same way for every kind."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_FILE = "classifier.json"


def read_artifact_meta(directory: str | Path, formats: tuple[int, ...] = (2, 3)) -> dict[str, Any]:
    """An artifact's classifier.json, checked to be of one of `formats`."""
    path = Path(directory) / META_FILE
    try:
        meta: Any = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        raise ValueError(f"{path}: not a classifier artifact of format {' or '.join(map(str, formats))}")
    return meta
