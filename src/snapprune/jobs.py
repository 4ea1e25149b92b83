"""A run's complete settings as one immutable ``Job``, and its recipe form (JSON or YAML).

A job names the model, the steps to apply to it in order (prune or shrink, then the steps later
stages add), the calibration data, the evaluation, how to execute (device, batch size, …) and
what to write. Every field's default is declared once, here or in the step's settings class;
the command line, recipes, sweeps and the Python API all read it from there. ``Job.to_dict``
/ ``job_from_dict`` are the recipe (``snapprune run RECIPE``), and every output carries the
recipe of the run that made it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .data import AUTO, DEFAULT_EVALUATION, check_source, default_windows
from .data import resolve_calibration_source as _resolve_source
from .engine.schemes import parse_scheme
from .errors import SnapPruneError
from .models.capture import ACTIVATION_PLACES
from .models.loading import DTYPES
from .models.settings import PruneSettings, QuantizeSettings, RecoverSettings, ShrinkSettings

RECIPE_VERSION = 1
DEFAULT_MAX_WINDOWS = 8
"""Perplexity windows per source unless asked otherwise: SmolLM2-135M's dense and pruned
evaluation then take about a minute together on a 2-core CPU. ``max_windows=None`` (``--max-windows
all``) evaluates every window."""


@dataclass(frozen=True)
class CalibrationSpec:
    """Calibration text. ``source`` ``auto``: C4 from the Hub when it answers, else the bundled
    sample. ``nsamples``/``seqlen`` ``None``: the source's own default (``data.SOURCES``)."""

    source: str = AUTO
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int = 0

    def resolved(self) -> tuple[CalibrationSpec, str | None]:
        """The spec with every value named (a Hub probe for ``auto``), and a note to print
        when the choice needs saying."""
        source, note = _resolve_source(self.source)
        nsamples, seqlen = default_windows(source)
        return replace(self, source=source, nsamples=self.nsamples or nsamples,
                       seqlen=self.seqlen or seqlen), note

    def check(self) -> None:
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SnapPruneError(f"calibration {name} must be a positive integer, "
                                     f"got {value!r}")
        if self.seqlen is not None and self.seqlen < 2:
            raise SnapPruneError("calibration seqlen must be at least 2 tokens")
        if not isinstance(self.seed, int):
            raise SnapPruneError(f"calibration seed must be an integer, got {self.seed!r}")
        check_source(self.source, calibration=True)


@dataclass(frozen=True)
class EvaluationSpec:
    """What every evaluated model is measured on. ``ppl`` ``None``: the bundled WikiText-2
    test split (none for a streamed run, which is never whole in memory). ``dense``: also the
    model before the steps, for comparison."""

    ppl: tuple[str, ...] | None = None
    seqlen: int = 2048
    max_windows: int | None = DEFAULT_MAX_WINDOWS
    zeroshot: tuple[str, ...] = ()
    limit: int | None = None
    dense: bool = True

    def __post_init__(self) -> None:
        for name in ("ppl", "zeroshot"):
            value = getattr(self, name)
            if isinstance(value, (list, str)):
                object.__setattr__(self, name, (value,) if isinstance(value, str)
                                   else tuple(value))

    def sources(self, streamed: bool = False) -> tuple[str, ...]:
        if self.ppl is None:
            return () if streamed else (DEFAULT_EVALUATION,)
        return self.ppl

    def empty(self, streamed: bool = False) -> bool:
        return not self.sources(streamed) and not self.zeroshot

    def check(self) -> None:
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise SnapPruneError(f"evaluation seqlen must be an integer >= 2, got {self.seqlen!r}")
        for name in ("max_windows", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise SnapPruneError(f"evaluation {name} must be a positive integer (or all), "
                                     f"got {value!r}")
        for source in self.sources():
            check_source(source, calibration=False)


@dataclass(frozen=True)
class Execution:
    """How to run: speed and memory, never the result — except ``deterministic``, which makes
    it bit-identical for any thread, batch or process count, and ``batch_size``, whose
    summation order moves the last bits without it."""

    device: str = "cpu"
    batch_size: int = 8
    activations: str = "auto"
    layer_errors: bool = True
    deterministic: bool = False
    stream: bool | None = None
    """Read, prune and write one block at a time; ``None``: when the model would not fit in
    memory."""

    def check(self) -> None:
        import torch

        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise SnapPruneError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.activations not in ACTIVATION_PLACES:
            raise SnapPruneError(f"unknown activation placement {self.activations!r}; use "
                                 f"{', '.join(ACTIVATION_PLACES)}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise SnapPruneError(f"unknown device {self.device!r}; use cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SnapPruneError("device cuda requested but no CUDA device is available; use cpu")


@dataclass(frozen=True)
class OutputSpec:
    """What the output directory holds: the model in ``format``, and whether a few greedy
    sample generations (before and after) go into the report."""

    format: str = "hf"
    samples: bool = True

    def check(self) -> None:
        from .export import get_format

        get_format(self.format)


STEP_KINDS: dict[str, type] = {"prune": PruneSettings, "shrink": ShrinkSettings,
                               "recover": RecoverSettings, "quantize": QuantizeSettings}
"""Every kind of step a job can hold, by the name recipes and the command line use."""
WEIGHT_STEPS = ("prune", "shrink")
"""Steps that remove weights; a job holds at most one, first."""
ORDER = ("prune", "shrink", "recover", "quantize")
"""The order steps run in (remove weights, win back quality, quantise); each at most once."""


def step_kind(step) -> str:
    for name, cls in STEP_KINDS.items():
        if type(step) is cls:
            return name
    raise SnapPruneError(f"{type(step).__name__} is not a step; use one of "
                         f"{', '.join(c.__name__ for c in STEP_KINDS.values())}")


@dataclass(frozen=True)
class Job:
    """One run: the model, the steps in order, and the data, evaluation, execution and output
    around them. Immutable; ``dataclasses.replace`` makes a changed copy."""

    model: str
    steps: tuple = ()
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    execution: Execution = field(default_factory=Execution)
    output: OutputSpec = field(default_factory=OutputSpec)
    dtype: str = "auto"
    revision: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.steps, tuple):
            object.__setattr__(self, "steps", tuple(self.steps))

    @property
    def needs_calibration(self) -> bool:
        return any(getattr(step, "needs_calibration", False) for step in self.steps)

    def validate(self) -> None:
        """Everything that can be refused without the model, refused before it is loaded."""
        if not isinstance(self.model, str) or not self.model:
            raise SnapPruneError("the job names no model")
        kinds = [step_kind(step) for step in self.steps]
        weight = [k for k in kinds if k in WEIGHT_STEPS]
        if len(weight) > 1 or (weight and kinds[0] not in WEIGHT_STEPS):
            raise SnapPruneError(f"steps {kinds}: a job removes weights once, as its first "
                                 "step (prune or shrink)")
        if kinds != sorted(kinds, key=ORDER.index) or len(set(kinds)) != len(kinds):
            raise SnapPruneError(f"steps {kinds}: each step at most once, in the order "
                                 f"{' → '.join(ORDER)}")
        for step in self.steps:
            step.check()
        recover = next((s for s in self.steps if isinstance(s, RecoverSettings)), None)
        if recover is not None:
            if recover.loss == "kd" and recover.teacher is None and not weight:
                from .models.teacher import teacher_source

                teacher_source(self.model)  # a one-line refusal when none can be named
            check_source(recover.data, calibration=True)
        quantize = next((s for s in self.steps if isinstance(s, QuantizeSettings)), None)
        if quantize is not None and "prune" in kinds \
                and not parse_scheme(quantize.scheme).exact_zero:
            raise SnapPruneError(f"{quantize.scheme}'s grid has no exact zero, so pruned weights "
                                 "would not stay 0; use q4_0, q8_0 or a w* scheme")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise SnapPruneError(f"unknown dtype {self.dtype!r}; choose auto, "
                                 f"{', '.join(DTYPES)}")
        if self.needs_calibration:
            self.calibration.check()
        self.evaluation.check()
        self.execution.check()
        self.output.check()
        from .export import get_format

        get_format(self.output.format).check_job(self)

    def resolved(self) -> tuple[Job, list[str]]:
        """The job with every default it will use named (calibration source and windows,
        sparsity, metric), and the notes that say so."""
        notes = []
        steps = tuple(step.resolved() if hasattr(step, "resolved") else step
                      for step in self.steps)
        for before, after in zip(self.steps, steps, strict=True):
            if isinstance(before, PruneSettings) and before.sparsity is None \
                    and ":" not in str(before.pattern):
                notes.append(f"sparsity: {after.sparsity:g} (the field's standard setting; "
                             "--sparsity S to change it)")
        calibration = self.calibration
        if self.needs_calibration:
            calibration, note = calibration.resolved()
            if note:
                notes.append(note)
        return replace(self, steps=steps, calibration=calibration), notes

    def to_dict(self) -> dict:
        """The recipe: plain JSON/YAML-able values."""
        out: dict[str, Any] = {"snapprune_recipe": RECIPE_VERSION, "model": self.model}
        if self.revision is not None:
            out["revision"] = self.revision
        out["dtype"] = self.dtype
        out["steps"] = [{step_kind(s): _plain(dataclasses.asdict(s))} for s in self.steps]
        for name in ("calibration", "evaluation", "execution", "output"):
            out[name] = _plain(dataclasses.asdict(getattr(self, name)))
        return out


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def section(cls, values: Any, where: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise SnapPruneError(f"recipe {where} must be a mapping of settings, got {values!r}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SnapPruneError(f"recipe {where}: unknown setting(s) {unknown}; use "
                             f"{', '.join(sorted(known))}")
    converted = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**converted)
    except TypeError as exc:
        raise SnapPruneError(f"recipe {where}: {exc}") from None


TOP_KEYS = ("snapprune_recipe", "model", "revision", "dtype", "steps", "calibration",
            "evaluation", "execution", "output")


def job_from_dict(recipe: dict, *, where: str = "recipe") -> Job:
    """A ``Job`` from its recipe form; unknown keys and steps are refused in one line."""
    if not isinstance(recipe, dict):
        raise SnapPruneError(f"{where} is not a mapping of settings")
    unknown = sorted(set(recipe) - set(TOP_KEYS))
    if unknown:
        raise SnapPruneError(f"{where}: unknown key(s) {unknown}; use {', '.join(TOP_KEYS)}")
    version = recipe.get("snapprune_recipe", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise SnapPruneError(f"{where} is recipe version {version}; this snapprune reads "
                             f"version {RECIPE_VERSION}")
    if "model" not in recipe:
        raise SnapPruneError(f"{where} names no model")
    steps = []
    for number, item in enumerate(recipe.get("steps") or [], 1):
        if not isinstance(item, dict) or len(item) != 1:
            raise SnapPruneError(f"{where}: step {number} must be one mapping like "
                                 "{prune: {method: thanos, ...}}")
        (kind, settings), = item.items()
        if kind not in STEP_KINDS:
            raise SnapPruneError(f"{where}: unknown step {kind!r}; use "
                                 f"{', '.join(STEP_KINDS)}")
        steps.append(section(STEP_KINDS[kind], settings or {}, f"{where} step {kind}"))
    return Job(
        model=str(recipe["model"]), steps=tuple(steps),
        calibration=section(CalibrationSpec, recipe.get("calibration"), f"{where} calibration"),
        evaluation=section(EvaluationSpec, recipe.get("evaluation"), f"{where} evaluation"),
        execution=section(Execution, recipe.get("execution"), f"{where} execution"),
        output=section(OutputSpec, recipe.get("output"), f"{where} output"),
        dtype=recipe.get("dtype", "auto"), revision=recipe.get("revision"))


def read_recipe(path: str | Path) -> Job:
    """A job from a recipe file (YAML or JSON), or from a run's ``snapprune_report.json``
    (its ``recipe``): replaying a run is running its recipe again."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SnapPruneError(f"recipe {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SnapPruneError(f"cannot read recipe {path}: {first}") from None
    if isinstance(data, dict) and "snapprune_recipe" not in data and "recipe" in data:
        data = data["recipe"]  # a run's report
    return job_from_dict(data, where=f"recipe {path.name}")


def recipe_text(job: Job) -> str:
    """The recipe as YAML, keys in declaration order."""
    import yaml

    return yaml.safe_dump(job.to_dict(), sort_keys=False, allow_unicode=True)
