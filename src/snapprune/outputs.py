"""Nothing lost: output directories appear whole or not at all, and snapprune only ever
replaces what it wrote itself.

- ``check_output_dir``: an existing ``--out`` is replaced (with ``overwrite``) only when it is
  empty or holds a snapprune report (``REPORT_NAME``) — anything else is refused in one line;
- ``move_into_place``: a finished temporary directory beside ``out`` is renamed into place, the
  old output kept until the new one is there;
- JSON is written atomically and strictly (``allow_nan=False``): a value that is not a number
  (NaN, ±Inf) becomes ``null``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from .errors import SnapPruneError

REPORT_NAME = "snapprune_report.json"
RECIPE_NAME = "snapprune_recipe.yaml"


def written_by_snapprune(path: Path) -> bool:
    """A directory holding a snapprune report, or an empty one: what ``overwrite`` may
    replace."""
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / REPORT_NAME).is_file() or not any(path.iterdir())


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """The resolved output path, or a one-line refusal: an existing ``out`` without
    ``overwrite``, or one snapprune did not write; a read-only parent. Missing parents are
    made."""
    out = Path(out).expanduser().resolve()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise SnapPruneError(f"output directory {out} already exists; pass --overwrite or "
                                 "choose another --out")
        if not written_by_snapprune(out):
            raise SnapPruneError(
                f"{out} exists and was not written by snapprune (no {REPORT_NAME} in it); "
                "--overwrite only replaces snapprune's own outputs or empty directories: "
                "choose another --out")
    parent = out.parent
    if not parent.is_dir():
        # Missing parents are made (as ``mkdir -p``): nothing of the user's is touched.
        existing = next(p for p in parent.parents if p.exists() or p.is_symlink())
        if not existing.is_dir():
            raise SnapPruneError(f"{existing} is a file, so --out {out} cannot be made; "
                                 "choose another --out")
        if not os.access(existing, os.W_OK):
            raise SnapPruneError(f"cannot write to {existing}; choose another --out")
        parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise SnapPruneError(f"cannot write to {parent}; choose another --out")
    return out


def temporary_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` (same file system: the rename is atomic)."""
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


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


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary directory to ``out``, replacing an older ``out`` (checked
    again: only snapprune's own or an empty one) only once the new one is complete."""
    ordinary_permissions(tmp)
    if out.exists() or out.is_symlink():
        if not written_by_snapprune(out):
            raise SnapPruneError(f"{out} appeared during the run and was not written by "
                                 f"snapprune; the result is kept in {tmp}")
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(backup)
        tmp.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        tmp.rename(out)


def json_safe(value):
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(payload) -> str:
    """Strict JSON (``allow_nan=False``) of ``payload`` with missing numbers as ``null``."""
    return json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n"


def write_json_atomic(path: str | Path, payload) -> None:
    """Write strict JSON to a temporary file beside ``path`` and rename it into place."""
    write_text_atomic(path, json_text(payload))


def write_atomic(path: str | Path, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then renamed into place:
    ``path`` holds the old content or the new, never a part (every file snapprune writes
    outside a temporary directory goes through here)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    os.close(fd)
    try:
        write(Path(tmp))
        ordinary_permissions(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text to a temporary file beside ``path`` and rename it into place."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_directory(out: str | Path, fill, *, overwrite: bool = False) -> Path:
    """Create ``out`` atomically: ``fill(tmp)`` writes everything into a temporary sibling,
    which is then renamed into place. An interrupted save leaves no partial ``out``."""
    out = check_output_dir(out, overwrite)
    tmp = temporary_dir(out)
    try:
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, out)
    return out
