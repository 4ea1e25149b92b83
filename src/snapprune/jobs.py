"""A run's complete settings as one immutable ``Job``, and its recipe form (JSON or YAML).

A job names the model, the steps to apply to it in order, the calibration data, the
evaluation, how to execute (device, batch size, …) and what to write. Every field's default is
declared once, here or in the step's settings class; the command line, recipes, sweeps and the
Python API all read it from there. A job is data: what each step kind does and which steps
may follow which is the steps' (``steps``); ``Job.to_dict`` and ``recipes.job_from_dict`` are
the recipe form (``snapprune run RECIPE``), and every output carries the recipe of the run that
made it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any

from .data import AUTO, DEFAULT_EVALUATION, check_source, default_windows
from .data import resolve_calibration_source as _resolve_source
from .errors import SnapPruneError
from .models.capture import ACTIVATION_PLACES, BATCH_SIZE
from .models.experts import MIN_TOKENS as MOE_MIN_TOKENS
from .models.experts import CalibrationPolicy
from .models.loading import DTYPES

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
    moe: str = "routed"
    """Mixtures of experts: each expert's statistics from its ``routed`` tokens, or from
    every token (``all-experts``); see ``models.experts``."""
    moe_min_tokens: int = MOE_MIN_TOKENS
    """Routed tokens below which an expert falls back to every token's statistics."""

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
        CalibrationPolicy(self.moe, self.moe_min_tokens).check()


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
    batch_size: int = BATCH_SIZE
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
    def kinds(self) -> tuple[str, ...]:
        """The step kinds in order, by the names recipes use (``prune``, ``quantize``, ...)."""
        return tuple(step.kind for step in self.steps)

    def settings(self, kind: str):
        """The settings of the job's ``kind`` step, or ``None`` (each kind at most once)."""
        return next((step for step in self.steps if step.kind == kind), None)

    def check_sections(self, *, calibrated: bool) -> None:
        """Refuse bad settings of the sections around the steps (``calibrated``: the steps
        read calibration text, so its spec is checked too)."""
        if not isinstance(self.model, str) or not self.model:
            raise SnapPruneError("the job names no model")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise SnapPruneError(f"unknown dtype {self.dtype!r}; choose auto, "
                                 f"{', '.join(DTYPES)}")
        if calibrated:
            self.calibration.check()
        self.evaluation.check()
        self.execution.check()
        self.output.check()

    def to_dict(self) -> dict:
        """The recipe: plain JSON/YAML-able values."""
        out: dict[str, Any] = {"snapprune_recipe": RECIPE_VERSION, "model": self.model}
        if self.revision is not None:
            out["revision"] = self.revision
        out["dtype"] = self.dtype
        out["steps"] = [{s.kind: _plain(dataclasses.asdict(s))} for s in self.steps]
        for name in ("calibration", "evaluation", "execution", "output"):
            out[name] = _plain(dataclasses.asdict(getattr(self, name)))
        return out


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def recipe_text(job: Job) -> str:
    """The recipe as YAML, keys in declaration order."""
    import yaml

    return yaml.safe_dump(job.to_dict(), sort_keys=False, allow_unicode=True)
