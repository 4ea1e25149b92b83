"""Recipes: a job as YAML or JSON (``snapprune run RECIPE``, ``--recipe FILE``), read back
strictly. Unknown keys and steps, values of the wrong type and YAML aliases are refused in
one line before anything runs; every output carries the recipe of the run that made it
(``jobs.recipe_text``)."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import SnapPruneError
from .jobs import RECIPE_VERSION, CalibrationSpec, EvaluationSpec, Execution, Job, OutputSpec
from .steps import REGISTRY, step_named

TOP_KEYS = ("snapprune_recipe", "model", "revision", "dtype", "steps", "calibration",
            "evaluation", "execution", "output")
MAX_RECIPE_BYTES = 1 << 20
"""A recipe is a few hundred bytes; a larger file is not one."""


def _accepts(value: Any, hint: Any) -> bool:
    """Whether a recipe value (plain JSON/YAML types) fits a settings field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(
            any(_accepts(v, a) for a in args) for v in value)
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def section(cls, values: Any, where: str):
    """Settings of type ``cls`` from a recipe mapping: unknown names and values of the wrong
    type refused in one line."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise SnapPruneError(f"recipe {where} must be a mapping of settings, got "
                             f"{type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise SnapPruneError(f"recipe {where}: unknown setting(s) {unknown}; use "
                             f"{', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        if not _accepts(value, hints[name]):
            raise SnapPruneError(f"recipe {where}: {name} must be {_type_name(hints[name])}, "
                                 f"got {type(value).__name__} {str(value)[:40]!r}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**converted)
    except TypeError as exc:
        raise SnapPruneError(f"recipe {where}: {exc}") from None


def job_from_dict(recipe: dict, *, where: str = "recipe") -> Job:
    """A ``Job`` from its recipe form; unknown keys and steps are refused in one line."""
    if not isinstance(recipe, dict):
        raise SnapPruneError(f"{where} is not a mapping of settings")
    unknown = sorted(str(k) for k in set(recipe) - set(TOP_KEYS))
    if unknown:
        raise SnapPruneError(f"{where}: unknown key(s) {unknown}; use {', '.join(TOP_KEYS)}")
    version = recipe.get("snapprune_recipe", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise SnapPruneError(f"{where} is recipe version {version}; this snapprune reads "
                             f"version {RECIPE_VERSION}")
    if "model" not in recipe:
        raise SnapPruneError(f"{where} names no model")
    for key in ("model", "revision", "dtype"):
        value = recipe.get(key)
        if (value is not None and not isinstance(value, str)) or (key == "model" and not value):
            raise SnapPruneError(f"{where}: {key} must be a string, got "
                                 f"{type(value).__name__}")
    items = recipe.get("steps") or []
    if not isinstance(items, list):
        raise SnapPruneError(f"{where}: steps must be a list like [{{prune: {{...}}}}]")
    steps = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or len(item) != 1:
            raise SnapPruneError(f"{where}: step {number} must be one mapping like "
                                 "{prune: {method: thanos, ...}}")
        (kind, settings), = item.items()
        if kind not in REGISTRY:
            raise SnapPruneError(f"{where}: unknown step {kind!r}; use {', '.join(REGISTRY)}")
        steps.append(section(step_named(kind).settings_type, settings or {},
                             f"{where} step {kind}"))
    return Job(
        model=recipe["model"], steps=tuple(steps),
        calibration=section(CalibrationSpec, recipe.get("calibration"), f"{where} calibration"),
        evaluation=section(EvaluationSpec, recipe.get("evaluation"), f"{where} evaluation"),
        execution=section(Execution, recipe.get("execution"), f"{where} execution"),
        output=section(OutputSpec, recipe.get("output"), f"{where} output"),
        dtype=recipe.get("dtype", "auto"), revision=recipe.get("revision"))


def _no_aliases_loader():
    """PyYAML's safe loader with anchors and aliases refused: a recipe never needs them, and
    a few hundred bytes of nested aliases expand to gigabytes."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"aliases are not allowed in a recipe (line "
                                     f"{event.start_mark.line + 1}): write the value out")
            return super().compose_node(parent, index)

    return Loader


def read_recipe(path: str | Path) -> Job:
    """A job from a recipe file (YAML or JSON), or from a run's ``snapprune_report.json``
    (its ``recipe``): replaying a run is running its recipe again."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SnapPruneError(f"recipe {path} not found")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise SnapPruneError(f"recipe {path} is larger than {MAX_RECIPE_BYTES >> 20} MiB; "
                                 "a recipe is a few hundred bytes of settings")
        text = path.read_text(encoding="utf-8")
        data = (json.loads(text) if path.suffix == ".json"
                else yaml.load(text, Loader=_no_aliases_loader()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError,
            RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnapPruneError(f"cannot read recipe {path}: {first[:200]}") from None
    if isinstance(data, dict) and "snapprune_recipe" not in data and "recipe" in data:
        data = data["recipe"]  # a run's report
    return job_from_dict(data, where=f"recipe {path.name}")
