"""results.json: written atomically by every entry point, read by the report. The single source
of every number a user sees."""
from __future__ import annotations

import json
from pathlib import Path

from lcredit.diagnostics.protocol import finite
from lcredit.files import atomic_write


def write_json(path: Path, obj) -> None:
    """Atomic write; non-finite floats become null (valid JSON) rather than NaN tokens."""
    atomic_write(path, json.dumps(finite(obj), indent=2))


def write_text(path: Path, text: str) -> None:
    """A report's text, written atomically like results."""
    atomic_write(path, text)


def read_json(path: Path) -> dict | None:
    """A results file, or None when it is missing or unreadable (a job that never finished)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
