"""The ``snapprune`` command: parse arguments into a ``Job`` (``cli.build``), run it with
``run.execute`` (``cli.commands``), print what happened and what to do next. The parser is
built from the step kinds' declarations (``cli.parser``).

Every setting flag is optional and has no argparse default: a flag the user did not give
leaves the job's declared default (``jobs``, ``models.settings``) or the recipe's value, so
defaults live in one place and ``--recipe`` combines with flags that override it.
"""

from __future__ import annotations

import sys
import warnings

from ..errors import SnapPruneError
from ..recipes import read_recipe
from ..steps import REGISTRY
from .build import job_from_args
from .commands import run_eval, run_generate, run_job, run_sweep
from .parser import build_parser

__all__ = ["build_parser", "job_from_args", "main"]

COMMANDS = {"eval": run_eval, "sweep": run_sweep, "generate": run_generate}
"""Commands that run in one process (the step commands and ``run`` may use several)."""


def _job(args):
    if args.command == "run":
        return read_recipe(args.recipe)
    return job_from_args(args, args.command)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. damping raised for a layer) as one line each, no source location."""
    print(f"snapprune: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = "snapprune"
    job = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("default", module=r"snapprune\.")
            warnings.showwarning = _print_warning
            if args.command in REGISTRY or args.command == "run":
                job = _job(args)
                prefix = _join_ranks(job.execution.device)
                return run_job(job, args, ["snapprune", *argv])
            _refuse_ranks(args.command)
            return COMMANDS[args.command](args, ["snapprune", *argv])
    except SnapPruneError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except OSError as exc:  # disk full, permission, a name too long: one line, what to do
        print(f"{prefix}: error: {os_error_line(exc, job, getattr(args, 'out', None))}",
              file=sys.stderr)
        return 2
    finally:
        _leave_ranks()


def os_error_line(exc: OSError, job, out) -> str:
    """An operating-system error as one line: what failed, where, and what to do."""
    import errno
    from pathlib import Path

    where = f" ({exc.filename})" if exc.filename else ""
    what = exc.strerror or str(exc)
    fix = {errno.ENOSPC: "free some space or choose another --out",
           errno.EDQUOT: "free some space or choose another --out",
           errno.EACCES: "check the permissions or choose another path",
           errno.EPERM: "check the permissions or choose another path",
           errno.EROFS: "choose a path on a writable file system",
           errno.ENAMETOOLONG: "choose a shorter name"}.get(exc.errno, "check the path")
    kept = []
    if job is not None and out:
        from ..steps import kept_progress

        kept = kept_progress(job, Path(out).expanduser().resolve())
    again = (f"; progress is kept in {kept[0]}: run the same command with --resume" if kept
             else "; nothing was saved: run the same command again")
    return f"{what}{where}: {fix}{again}"


def _join_ranks(device: str) -> str:
    """Under ``torchrun``: join the process group; return the prefix of this process's
    messages."""
    from ..models.distributed import init_from_environment, launched_by_torchrun

    if not launched_by_torchrun():
        return "snapprune"
    group = init_from_environment(device)
    return f"snapprune [rank {group.rank}/{group.world}]"


def _refuse_ranks(command: str) -> None:
    from ..models.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise SnapPruneError(f"snapprune {command} runs in one process; launch it without "
                             "torchrun (prune, shrink and run use several)")


def _leave_ranks() -> None:
    from ..models.distributed import leave_group

    leave_group()
