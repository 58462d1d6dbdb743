"""results.json: written atomically by every entry point, read by the report. The single source
of every number a user sees."""
from __future__ import annotations

import json
import platform
import subprocess
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


def versions() -> dict:
    """The versions and the commit a result was produced with (saved with every result)."""
    import hydra as _hydra
    import lightning
    import torch
    import torchvision

    import lcredit

    out = {"lcredit": lcredit.__version__, "python": platform.python_version(),
           "torch": torch.__version__, "torchvision": torchvision.__version__,
           "lightning": lightning.__version__, "hydra": _hydra.__version__}
    try:
        repo = Path(__file__).resolve().parents[2]
        out["git_commit"] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
            timeout=5).stdout.strip() or None
        out["git_dirty"] = bool(subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out
