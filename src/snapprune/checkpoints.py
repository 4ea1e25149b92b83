"""Checkpoints that are whole or absent, for every run that can be resumed.

A checkpoint is a directory: its files are written into a hidden temporary directory beside
the others, their SHA-256 hashes and the run's state go into a manifest written last, the
directory is renamed into place, and only then the pointer to the newest checkpoint
(``LATEST``) is replaced atomically and older checkpoints removed. A kill at any moment
leaves the previous checkpoint whole and pointed to; on resume the manifest's hashes are
verified, so a checkpoint changed or truncated since is refused, never read half.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import SnapPruneError
from .outputs import json_text, write_text_atomic

LATEST = "snapprune_latest.json"
MANIFEST = "snapprune_checkpoint.json"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_checkpoint(root: Path, name: str, write: Callable[[Path], None], state: dict) -> Path:
    """Write checkpoint ``name`` under ``root``: ``write(directory)`` fills a fresh directory,
    ``state`` (JSON) goes into its manifest with every file's hash; then it becomes the
    newest and older ones are removed."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write(tmp)
        files = {p.name: file_digest(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json_text({"state": state, "files": files}),
                                    encoding="utf-8")
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text_atomic(root / LATEST, json_text({"checkpoint": name}))
    for other in root.iterdir():
        if other.is_dir() and other.name != name:
            shutil.rmtree(other, ignore_errors=True)
    return final


def latest_checkpoint(root: Path, *, verify: bool = True) -> tuple[Path, dict] | None:
    """The newest checkpoint under ``root`` and its state, or ``None`` when there is none; a
    one-line refusal when it is damaged (``verify``: every file's hash checked)."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
        directory = root / str(name)
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        state, files = manifest["state"], manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SnapPruneError(f"the checkpoint in {root} is damaged (its manifest cannot be "
                             "read); --restart to discard it and start over") from None
    if verify:
        for file, digest in files.items():
            path = directory / file
            if not path.is_file() or file_digest(path) != digest:
                raise SnapPruneError(f"the checkpoint in {directory} is damaged ({file} is "
                                     "missing or changed since it was written); --restart to "
                                     "discard it and start over")
    return directory, state
