"""The step protocol: what every kind of step declares once and the hooks the run path calls.

A step kind is one subclass of ``Step`` in its own module under ``steps/``: its settings type
and facts (what it needs, what it changes, whether it removes weights, what may run in the
same pass), its checks (``check`` before anything is loaded, ``check_model`` once the model
is), its estimate, ``apply`` (the work), and how it is told (log line, summary line, report
section, next step). Defining the subclass registers it (``__init_subclass__``, as gguf-py
registers its quant types); ``steps/__init__.py`` imports every kind's module once. Nothing
outside ``steps/`` branches on a step's type: ``run``, ``estimate``, ``summary``, ``report``,
the CLI and recipes read the registry and call these hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import SnapPruneError
from ..flags import Command, Flag

REGISTRY: dict[str, Step] = {}
"""Every step kind by the name recipes use, in the order a job runs them."""


@dataclass
class StepContext:
    """What a job's steps share while it runs: the job, the workbench holding the model, the
    output directory, how to resume, and each kind's own state (``state[kind]``: what its
    ``begin`` prepared)."""

    job: Any
    bench: Any
    out: Path | None
    resume: bool = False
    restart: bool = False
    log: Callable[[str], None] = field(default=lambda _message: None)
    verbose: bool = False
    progress: bool = True
    state: dict[str, Any] = field(default_factory=dict)
    execute: Callable[..., Any] | None = None
    """The run path itself (``run.execute``), for a step that runs other jobs (``search``
    cuts each candidate structure with the prune-depth and shrink steps)."""


@dataclass
class Probe:
    """What the estimate measured once for every step: a copy of the first block on the
    device, its layers (block-relative names) and their statistics on one calibration window
    (``None`` when no step reads calibration data)."""

    model: Any
    device: Any
    layers: dict[str, Any]
    stats: dict[str, Any] | None
    layer_errors: bool
    job: Any = None


@dataclass
class EstimatePart:
    """One step's share of the estimate: solver seconds for one block (scaled by the depth),
    training seconds for the whole run."""

    solver_seconds: float = 0.0
    training_seconds: float = 0.0
    passes: float = 0.0
    """Calibration passes over the whole model it makes beyond the job's one (``search``
    cuts and scores several structures)."""


class Step:
    """One kind of step. Subclasses set the class facts and override the hooks they need."""

    name: ClassVar[str]
    settings_type: ClassVar[type]
    order: ClassVar[int]
    """Where it runs in a job (lower first); kinds of one order exclude each other."""
    label: ClassVar[str]
    """What the model after it is called (``pruned``, ``quantised``)."""
    verb: ClassVar[str]
    """What it does, for summary lines (``prune``, ``quantise``)."""
    removes_weights: ClassVar[bool] = False
    """Removes weights (zeros or whole units): at most one such step, the job's first; the
    model before it is the dense one."""
    changes: ClassVar[frozenset[str]] = frozenset()
    """What it changes: ``zeros`` (weights set to exactly 0), ``shapes`` (layers cut smaller),
    ``grid`` (weights on a quantisation grid), ``values`` (weights trained)."""
    fuses: ClassVar[tuple[str, ...]] = ()
    """Kinds that, directly after it, run in the same pass on the same statistics (joint)."""
    single_process: ClassVar[str | None] = None
    """The refusal under ``torchrun`` when it runs in one process only (``None``: any)."""
    streams: ClassVar[bool] = False
    """Can run block by block from the checkpoint's shards (a model larger than memory)."""
    records_layers: ClassVar[bool] = True
    """Its run record holds per-layer records and the block pass's timing (the report's
    ``layers`` and ``timing`` come from the first such step)."""
    suggest_rank: ClassVar[int] = 0
    """Where its ``next_step`` line stands in the closing summary."""
    command: ClassVar[Command | None] = None
    flags: ClassVar[tuple[Flag, ...]] = ()
    fused_flags: ClassVar[tuple[Flag, ...]] = ()
    """Its flags on the command of a step it fuses into (``--quantize`` on ``prune``)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in REGISTRY:
                raise SnapPruneError(f"a step kind named {cls.name!r} is already registered")
            REGISTRY[cls.name] = cls()
            ordered = sorted(REGISTRY.values(), key=lambda step: step.order)
            REGISTRY.clear()
            REGISTRY.update((step.name, step) for step in ordered)

    # -- before anything is loaded ---------------------------------------------------------

    def needs_calibration(self, settings) -> bool:
        """Whether calibration text enters its result."""
        return bool(settings.needs_calibration)

    def check(self, settings, job) -> None:
        """Refuse bad settings, and what the job's other steps rule out, in one line."""
        settings.check()

    def resolve(self, settings, job) -> tuple[Any, list[str]]:
        """The settings with every default it will use named, and notes that say so."""
        return settings.resolved(), []

    # -- once the model is loaded -----------------------------------------------------------

    def check_model(self, settings, job, model) -> None:
        """Refusals that need the model (layer widths, finite weights)."""

    def estimate_layers(self, settings, model) -> dict[str, float | None]:
        """The first block's layers it changes (block-relative names), each with the fraction
        it removes (``None``: none), for the estimate's statistics pass."""
        return {}

    def estimate(self, settings, probe: Probe) -> EstimatePart:
        return EstimatePart()

    # -- running -----------------------------------------------------------------------------

    def begin(self, settings, context: StepContext) -> None:
        """Before any step of the job runs (refuse stale progress; keep what it needs of the
        model as it is now)."""

    def apply(self, settings, context: StepContext, fused=None):
        """Do the work on ``context.bench.model`` (in place, or replacing it); ``fused``: the
        settings of the next step when it runs in the same pass. Returns the run record."""
        raise NotImplementedError

    def fused_runs(self, run) -> list[tuple[str, Any]]:
        """The records of the steps that ran in its pass, by kind."""
        return []

    def finished(self, settings, context: StepContext) -> None:
        """After the output is saved (remove progress kept for resuming)."""

    def kept_progress(self, out: Path) -> Path | None:
        """Where a stopped run into ``out`` keeps progress that ``--resume`` continues."""
        return None

    # -- telling what it did ----------------------------------------------------------------

    def log_line(self, run, *, fused: bool = False) -> str:
        return f"{self.verb}: done in {run.total_seconds:.1f}s"

    def summary(self, run) -> str:
        return self.verb

    def report(self, run) -> dict:
        """Its keys of the JSON report."""
        return {}

    def files(self, run, directory: Path) -> list[str]:
        """Extra files it writes into the output (plots); the names written."""
        return []

    def next_step(self, job, where) -> str | None:
        """A line of the closing summary's ``next:`` list, or ``None``."""
        return None

    def compare_with(self, settings, job) -> str | None:
        """The model the output is best compared with, when not the job's input."""
        return None


def whole_model_pass(context: StepContext, work, settings):
    """Run ``work(model, calibration, settings, **options)`` — a pass that scores the whole
    model (prune-depth, prune-experts), which keeps its activations where it likes — on the
    bench's model, which the result replaces; returns the run with the pass's data time."""
    bench = context.bench
    block_pass = bench.block_pass(context.job, calibrated=True, verbose=context.verbose)
    options = {k: v for k, v in block_pass.options.items() if k != "activations"}
    bench.model, run = work(bench.model, None, settings, **options)
    return block_pass.account(run)


def step_for(settings) -> Step:
    """The kind of a step's settings (by its declared ``kind``), or a one-line refusal."""
    step = REGISTRY.get(getattr(settings, "kind", None))
    if step is None or type(settings) is not step.settings_type:
        raise SnapPruneError(f"{type(settings).__name__} is not a step; use one of "
                             f"{', '.join(s.settings_type.__name__ for s in REGISTRY.values())}")
    return step


def step_named(name: str) -> Step:
    if name not in REGISTRY:
        raise SnapPruneError(f"unknown step {name!r}; use {', '.join(REGISTRY)}")
    return REGISTRY[name]


def earlier_changes(job, kind: str) -> frozenset[str]:
    """What the job's steps before ``kind`` change (``zeros``, ``shapes``, ...)."""
    changed: set[str] = set()
    for settings in job.steps:
        if settings.kind == kind:
            break
        changed |= step_for(settings).changes
    return frozenset(changed)


def removes_weights(job) -> bool:
    return any(step_for(settings).removes_weights for settings in job.steps)
