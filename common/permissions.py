"""File modes of what is written for others to read: model artifacts and indices.

Temp files and folders (mkstemp, mkdtemp, safetensors' own writes) are created owner-only, but a
service often runs as another user than the trainer or builder (the Docker image's user), so a
finished artifact or index is made world-readable before it is renamed into place.
"""

from __future__ import annotations

from pathlib import Path


def make_readable(root: Path) -> None:
    """Files 0644 and folders 0755 under (and including) the folder `root`."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
