"""The step kinds and the rules a job's steps follow, read from their declarations.

Every kind is one module here, registered by defining its ``Step`` subclass; the import line
below is the one place that names them all. Adding a kind: a new module (settings type, facts,
hooks, command) and its name on that line.
"""

from __future__ import annotations

from itertools import dropwhile, pairwise
from pathlib import Path

from ..errors import SnapPruneError
from . import depth, experts, prune, quantize, recover, search, shrink  # noqa: F401  (every step kind, once)
from .base import (
    REGISTRY,
    EstimatePart,
    Probe,
    Step,
    StepContext,
    earlier_changes,
    removes_weights,
    step_for,
    step_named,
)

__all__ = ["REGISTRY", "EstimatePart", "Probe", "Step", "StepContext", "after_label",
           "before_label", "check_job", "earlier_changes", "kept_progress", "needs_calibration",
           "removes_weights", "resolve_job", "stages", "step_for", "step_named"]


def needs_calibration(job) -> bool:
    """Whether any step reads calibration text."""
    return any(step_for(s).needs_calibration(s) for s in job.steps)


def check_job(job) -> None:
    """Everything that can be refused without the model, refused before it is loaded: the
    steps' order, each step's settings and the rules between them, the sections around them,
    and whether the output format can hold the result."""
    kinds = [step_for(s) for s in job.steps]
    names = [k.name for k in kinds]
    leading = len(kinds) - len(list(dropwhile(lambda k: k.removes_weights, kinds)))
    if any(k.removes_weights for k in kinds[leading:]):
        which = ", ".join(k.name for k in REGISTRY.values() if k.removes_weights)
        raise SnapPruneError(f"steps {names}: steps that remove weights ({which}) come first, "
                             "before any other step")
    orders = [k.order for k in kinds]
    if any(a >= b for a, b in pairwise(orders)) or len(set(names)) != len(names):
        raise SnapPruneError(f"steps {names}: each step at most once, in the order "
                             f"{' → '.join(REGISTRY)} ({_exclusive()})")
    for kind, settings in zip(kinds, job.steps, strict=True):
        kind.check(settings, job)
    job.check_sections(calibrated=needs_calibration(job))
    from ..export import get_format

    get_format(job.output.format).check_job(job)


def _exclusive() -> str:
    """The kinds that share an order and so exclude each other, as words."""
    groups: dict[int, list[str]] = {}
    for kind in REGISTRY.values():
        groups.setdefault(kind.order, []).append(kind.name)
    return "; ".join(" or ".join(g) + ", not both" for g in groups.values() if len(g) > 1)


def resolve_job(job):
    """The checked job with every default it will use named (calibration source and windows,
    sparsity, metric), and the notes that say so."""
    from dataclasses import replace

    check_job(job)
    notes: list[str] = []
    steps = []
    for settings in job.steps:
        resolved, said = step_for(settings).resolve(settings, job)
        steps.append(resolved)
        notes += said
    calibration = job.calibration
    if needs_calibration(job):
        calibration, note = calibration.resolved()
        calibration.check()
        if note:
            notes.append(note)
    return replace(job, steps=tuple(steps), calibration=calibration), notes


def stages(job) -> list[tuple[Step, object, object | None]]:
    """The passes a job's steps run in: ``(kind, settings, settings fused into the pass or
    None)``. A step followed by a kind it fuses is one pass (joint: the same statistics,
    each layer quantised right after it is pruned)."""
    out, index = [], 0
    steps = job.steps
    while index < len(steps):
        kind = step_for(steps[index])
        following = steps[index + 1] if index + 1 < len(steps) else None
        if following is not None and following.kind in kind.fuses:
            out.append((kind, steps[index], following))
            index += 2
        else:
            out.append((kind, steps[index], None))
            index += 1
    return out


def after_label(job) -> str:
    """How the model after the job's steps is called (``pruned``, ``shrunk``, ...)."""
    return step_for(job.steps[-1]).label if job.steps else ""


def before_label(job) -> str:
    """How the model before them is called: ``dense`` when the job removes weights."""
    return "dense" if removes_weights(job) else "before"


def kept_progress(job, out: Path) -> list[Path]:
    """Progress a stopped run of ``job`` into ``out`` kept for ``--resume``."""
    found = (step_for(s).kept_progress(out) for s in job.steps)
    return [path for path in found if path is not None and path.exists()]
