"""Arguments → a ``Job``: the recipe's (``--recipe``) or the declared defaults, with every flag
the user gave on top. Destinations name what they set (``prune.sparsity``,
``calibration.nsamples``), so this reads them without knowing any step kind."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..errors import SnapPruneError
from ..jobs import Job
from ..recipes import read_recipe
from ..steps import step_named
from .parser import PATH_DESTS, SECTIONS, ZEROSHOT

CONVERT = {flag.field: flag.convert for flag in ZEROSHOT if flag.convert is not None}


def _value(dest: str, value):
    if dest in CONVERT:
        return CONVERT[dest](value)
    if dest in PATH_DESTS:
        value = [stored_path(v) for v in value] if isinstance(value, list) \
            else stored_path(value)
    return tuple(value) if isinstance(value, list) else value


def given_changes(given: dict, prefix: str) -> dict:
    """The given flags that set fields under ``prefix.``."""
    head = prefix + "."
    return {dest[len(head):]: _value(dest, value) for dest, value in given.items()
            if dest.startswith(head)}


def stored_path(spec: str) -> str:
    """A local model or file as an absolute path (a recipe replayed from elsewhere, a teacher
    named in a report, must find it); a Hub id, a source name or an alias as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def job_from_args(args: argparse.Namespace, kind: str | None) -> Job:
    """The job the arguments describe. A step kind's command runs that step, with the steps
    it fuses when their flags are given (``prune --quantize q4_0``); without a kind
    (``eval``), a job with no steps."""
    given = {k: v for k, v in vars(args).items() if k != "command"}
    step = step_named(kind) if kind is not None else None
    if given.get("recipe"):
        job = read_recipe(given["recipe"])
        allowed = {kind, *step.fuses} if step is not None else set()
        if step is not None and (not job.kinds or job.kinds[0] != kind
                                 or not set(job.kinds) <= allowed):
            raise SnapPruneError(f"recipe {given['recipe']} holds steps {list(job.kinds)}; "
                                 f"snapprune {kind} runs a {kind} step"
                                 + (f" (and {', '.join(step.fuses)})" if step.fuses else "")
                                 + " (snapprune run takes any recipe)")
    else:
        if "model" not in given:
            raise SnapPruneError(f"snapprune {args.command} needs --model (or --recipe FILE)")
        job = Job(model=given["model"], steps=(step.settings_type(),) if step else ())
    top = {k: given[k] for k in ("model", "revision", "dtype") if k in given}
    if "model" in top:
        top["model"] = stored_path(top["model"])
    job = dataclasses.replace(job, **top)
    steps = list(job.steps)
    if step is not None:
        for fused_kind in step.fuses:
            changes = given_changes(given, fused_kind)
            if not changes or fused_kind in job.kinds:
                continue
            fused = step_named(fused_kind)
            trigger = getattr(fused, "fused_trigger", None)
            if trigger is not None and trigger not in changes:
                names = {f.field: f.names[0] for f in fused.fused_flags}
                others = [names[f] for f in changes if f in names]
                raise SnapPruneError(f"{', '.join(others)} set the {fused.verb}r's settings: "
                                     f"add {names[trigger]} "
                                     f"{fused.fused_flags[0].metavar or 'VALUE'}")
            steps.append(fused.settings_type())
    steps = [dataclasses.replace(s, **given_changes(given, s.kind)) for s in steps]
    job = dataclasses.replace(job, steps=tuple(steps))
    for section in SECTIONS:
        changes = given_changes(given, section)
        if section == "evaluation" and given.get("no_eval"):
            changes.update(ppl=(), zeroshot=())
        if changes:
            job = dataclasses.replace(job, **{section: dataclasses.replace(
                getattr(job, section), **changes)})
    return job
