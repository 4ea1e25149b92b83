"""Nothing lost: output directories appear whole or not at all, and snapprune only ever
replaces what it wrote itself.

- ``MARKER``: every directory snapprune creates as an output gets a marker file naming the run
  (written into the temporary directory before it is renamed into place, so only directories
  snapprune made hold one). ``--overwrite`` replaces only those, or empty directories; a report
  file alone (which ``--json PATH`` can put anywhere) proves nothing;
- ``output_lock``: an OS file lock beside ``--out``, held for the whole run: a second run into
  the same output is refused in one line naming the holder, never interleaved;
- ``check_output_dir`` refuses before any work and creates nothing; the missing parents are
  made only when the output is written;
- ``move_into_place``: a finished temporary directory beside ``out`` is renamed into place, the
  old output kept until the new one is there;
- JSON is written atomically and strictly (``allow_nan=False``): a value that is not a number
  (NaN, ±Inf) becomes ``null``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import SnapPruneError

REPORT_NAME = "snapprune_report.json"
RECIPE_NAME = "snapprune_recipe.yaml"


MARKER = ".snapprune-output"
"""The file that marks a directory as snapprune's own output (JSON: the run's id, when)."""


def mark_output(directory: Path) -> None:
    """Mark a directory snapprune is creating as its own (before it is renamed into place)."""
    (directory / MARKER).write_text(json.dumps({"run": uuid.uuid4().hex,
                                                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                                    + "\n", encoding="utf-8")


def written_by_snapprune(path: Path) -> bool:
    """A directory snapprune created (its marker is in it), or an empty one: what
    ``overwrite`` may replace."""
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / MARKER).is_file() or not any(path.iterdir())


def _name_fits(path: Path) -> None:
    """A one-line refusal for a name the file system cannot hold (before any work)."""
    limit = os.pathconf(next(p for p in [path, *path.parents] if p.exists()), "PC_NAME_MAX") \
        if hasattr(os, "pathconf") else 255
    for part in path.parts:
        if len(part.encode()) > limit:
            raise SnapPruneError(f"the name {part[:40]}… is longer than the file system allows "
                                 f"({limit} bytes); choose a shorter --out")


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """The resolved output path, or a one-line refusal: an existing ``out`` without
    ``overwrite``, or one snapprune did not write; a file in the way of its parents; a
    read-only parent. Nothing is created here (``make_parents`` does, when writing)."""
    out = Path(out).expanduser().resolve()
    _name_fits(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise SnapPruneError(f"output directory {out} already exists; pass --overwrite or "
                                 "choose another --out")
        if not written_by_snapprune(out):
            raise SnapPruneError(
                f"{out} exists and was not written by snapprune (it holds no {MARKER} marker); "
                "--overwrite only replaces snapprune's own outputs or empty directories: "
                "choose another --out")
    parent = out.parent
    existing = next(p for p in [parent, *parent.parents] if p.exists() or p.is_symlink())
    if not existing.is_dir():
        raise SnapPruneError(f"{existing} is a file, so --out {out} cannot be made; "
                             "choose another --out")
    if not os.access(existing, os.W_OK):
        raise SnapPruneError(f"cannot write to {existing}; choose another --out")
    return out


def make_parents(out: Path) -> list[Path]:
    """Make ``out``'s missing parents (as ``mkdir -p``): nothing of the user's is touched.
    Returns the directories made, deepest first."""
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    return made


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive OS lock on ``out`` (a lock file beside it) for the run; a second run
    into the same output is refused in one line naming the process that holds it. The lock
    file is snapprune's own and is removed when the run ends."""
    import fcntl

    made = make_parents(out)
    path = lock_path(out)
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise SnapPruneError(f"another snapprune run ({holder}) is writing {out}; wait for it "
                             "to finish, or choose another --out") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        handle.close()
        for directory in made:  # a run that wrote nothing leaves no parents behind
            with contextlib.suppress(OSError):
                directory.rmdir()


def stale_partials(out: Path) -> list[Path]:
    """Temporary directories a killed save left beside ``out`` (only snapprune makes these
    names; under the output lock none is in use)."""
    return sorted(p for p in out.parent.glob(f".{out.name}.partial-*")
                  if p.is_dir() and not p.name.endswith(("-stream", "-recover")))


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
    make_parents(out)
    tmp = temporary_dir(out)
    try:
        mark_output(tmp)
        fill(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, out)
    return out
