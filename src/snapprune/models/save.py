"""Write a pruned model atomically: the output directory appears only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import SnapPruneError

REPORT_NAME = "snapprune_report.json"


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output directory unless ``overwrite``; check the parent is writable."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise SnapPruneError(f"output directory {out} already exists; pass --overwrite or "
                             "choose another --out")
    parent = out.parent
    if not parent.is_dir():
        raise SnapPruneError(f"parent directory {parent} of --out does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise SnapPruneError(f"cannot write to {parent}; choose another --out")
    return out


def write_json_atomic(path: str | Path, payload: dict) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(path: Path) -> None:
    """Temporary files and directories are created private (0600/0700); what is renamed into
    place gets the permissions an ordinary file or directory would have under the umask."""
    mask = _umask()
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        ordinary_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary directory to ``out``, replacing an older ``out`` only once
    the new one is complete."""
    ordinary_permissions(tmp)
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(backup)
        tmp.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(out)


def save_pruned_model(model, tokenizer, out: str | Path, report: dict, *,
                      overwrite: bool = False) -> Path:
    """``save_pretrained`` (safetensors) + tokenizer + report into a temporary sibling directory,
    then one rename. An interrupted save leaves no partial ``out``."""
    out = check_output_dir(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / REPORT_NAME, report)
        move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
