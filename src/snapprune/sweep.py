"""Grids of pruning runs on one model: expand, run what is not done yet, record one line each.

A sweep loads the dense model once and restores its weights before every cell; it tokenises
each calibration set once and captures the first block's inputs once per calibration set (the
only activations that are valid across cells: deeper blocks see what the pruned blocks before
them produce). Results go to ``cells.jsonl``, one JSON object per finished cell, appended and
flushed as each cell ends, so an interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from .data import default_windows, resolve_calibration_source
from .engine import check_settings, get_method
from .errors import SnapPruneError
from .jobs import CalibrationSpec, EvaluationSpec, Execution, Job, OutputSpec
from .models.records import mean_layer_error
from .models.settings import PruneSettings, check_percdamp
from .outputs import json_safe
from .recipes import section
from .run import execute
from .workbench import Workbench

CELLS_FILE = "cells.jsonl"
DENSE = "dense"
LIST_AXES = ("method", "pattern", "sparsity", "alpha", "blocksize", "metric", "percdamp",
             "calib", "nsamples", "seqlen", "seed")
_PRUNE, _CALIBRATION = PruneSettings(), CalibrationSpec()
DEFAULTS = {"pattern": _PRUNE.pattern, "sparsity": PruneSettings.DEFAULT_SPARSITY,
            "alpha": _PRUNE.alpha, "blocksize": _PRUNE.blocksize, "metric": _PRUNE.metric,
            "percdamp": _PRUNE.percdamp, "calib": _CALIBRATION.source,
            "nsamples": _CALIBRATION.nsamples, "seqlen": _CALIBRATION.seqlen,
            "seed": _CALIBRATION.seed}
"""A grid's settings when it names none: the declared defaults of the run path (``None``
calibration windows: the source's own)."""


@dataclass(frozen=True)
class Cell:
    """One pruning configuration, in canonical form: settings that cannot change the result
    (α outside structured, block size for methods without updates, calibration for magnitude
    pruning) are ``None``, so equal results share one key."""

    method: str
    pattern: str | None = None
    sparsity: float | None = None
    alpha: float | None = None
    blocksize: int | None = None
    metric: str | None = None
    percdamp: float | None = None
    calib: str | None = None
    nsamples: int | None = None
    seqlen: int | None = None
    seed: int | None = None

    def key(self, model: str, revision: str | None = None, dtype: str = "auto") -> str:
        """The cell's identity in ``cells.jsonl``: its settings and the model they ran on
        (revision and dtype included), so another model never reads this model's cells."""
        text = json.dumps({**asdict(self), "model": model, "revision": revision,
                           "dtype": dtype}, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    @property
    def calibration_key(self) -> tuple | None:
        if self.calib is None:
            return None
        return (self.calib, self.nsamples, self.seqlen, self.seed)

    def settings(self) -> PruneSettings:
        """The cell's pruning settings (settings folded to ``None`` back to defaults)."""
        return PruneSettings(
            method=self.method, pattern=self.pattern, sparsity=self.sparsity,
            alpha=DEFAULTS["alpha"] if self.alpha is None else self.alpha,
            blocksize=DEFAULTS["blocksize"] if self.blocksize is None else self.blocksize,
            percdamp=DEFAULTS["percdamp"] if self.percdamp is None else self.percdamp,
            metric=self.metric)

    @property
    def calibration_spec(self) -> CalibrationSpec:
        return CalibrationSpec(*self.calibration_key) if self.calib is not None \
            else CalibrationSpec()


def canonical_cell(method: str, **settings) -> Cell:
    """Validate one configuration and drop what cannot matter (see ``Cell``)."""
    if method == DENSE:
        return Cell(DENSE)
    from .engine import parse_pattern

    s = {**DEFAULTS, **{k: v for k, v in settings.items() if v is not None or k == "metric"}}
    declared = get_method(method)  # the one-line "unknown method" error
    s["calib"], _ = resolve_calibration_source(str(s["calib"]))
    nsamples, seqlen = default_windows(s["calib"])
    s["nsamples"] = s["nsamples"] or nsamples
    s["seqlen"] = s["seqlen"] or seqlen
    # A grid may cross α with several patterns: α only exists for the structured one.
    alpha = s["alpha"] if parse_pattern(s["pattern"]).kind == "structured" else 0.0
    pattern, sparsity = check_settings(method, s["pattern"], _sparsity_for(s), alpha,
                                       int(s["blocksize"]), s["metric"])
    check_percdamp(s["percdamp"])
    metric = s["metric"] or declared.default_metric
    structured = pattern.kind == "structured"
    data_free = not declared.needs_activations(metric)
    return Cell(
        method=method,
        pattern=str(pattern),
        sparsity=round(float(sparsity), 6),
        alpha=float(alpha) if structured else None,
        blocksize=int(s["blocksize"]) if declared.uses_blocksize(pattern) else None,
        metric=metric,
        percdamp=float(s["percdamp"]) if declared.needs_hessian(metric) else None,
        calib=None if data_free else str(s["calib"]),
        nsamples=None if data_free else int(s["nsamples"]),
        seqlen=None if data_free else int(s["seqlen"]),
        seed=None if data_free else int(s["seed"]),
    )


def _sparsity_for(settings: dict) -> float | None:
    """N:M patterns fix the sparsity: a grid-wide sparsity list does not apply to them."""
    return None if ":" in str(settings["pattern"]) else settings["sparsity"]


@dataclass
class Grid:
    """A named Cartesian product of settings; ``zeroshot`` asks for zero-shot accuracy."""

    name: str
    cells: list[Cell]
    zeroshot: bool = False


def expand_grid(name: str, axes: dict, defaults: dict | None = None,
                zeroshot: bool = False) -> Grid:
    """All combinations of ``axes`` (each a value or a list of values) over ``defaults``.

    The method ``dense`` adds the unpruned model. Duplicates (after canonicalisation) are
    dropped, first occurrence kept.
    """
    unknown = set(axes) - set(LIST_AXES)
    if unknown:
        raise SnapPruneError(f"grid {name!r}: unknown setting(s) {sorted(unknown)}; "
                             f"use {', '.join(LIST_AXES)}")
    if "method" not in axes:
        raise SnapPruneError(f"grid {name!r} names no method")
    values = {axis: _as_list(axes.get(axis, (defaults or {}).get(axis, DEFAULTS.get(axis))))
              for axis in LIST_AXES}
    combos: list[dict] = [{}]
    for axis in LIST_AXES:
        combos = [{**c, axis: v} for c in combos for v in values[axis]]
    cells: list[Cell] = []
    for combo in combos:
        method = combo.pop("method")
        try:
            cell = canonical_cell(method, **combo)
        except SnapPruneError as exc:
            raise SnapPruneError(f"grid {name!r}: {exc}") from None
        if cell not in cells:
            cells.append(cell)
    return Grid(name, cells, zeroshot)


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def source_label(source: str) -> str:
    """How records name an evaluation source: a file by its name, a Hub dataset as given."""
    return Path(source).name if Path(source).exists() else source


def describe_evaluation(evaluation: EvaluationSpec, with_zeroshot: bool) -> dict:
    """How a cell was evaluated, as its record says (a finished cell counts only when it was
    evaluated at least as the sweep asks)."""
    out = {"ppl": {source_label(s): {"seqlen": evaluation.seqlen,
                                     "max_windows": evaluation.max_windows}
                   for s in evaluation.sources()}}
    if with_zeroshot and evaluation.zeroshot:
        out["zeroshot"] = {"tasks": [Path(t).stem for t in evaluation.zeroshot],
                           "limit": evaluation.limit}
    return out


@dataclass
class SweepPlan:
    """A sweep: the model, its grids, the one evaluation every cell gets, and how to run."""

    model: str
    grids: list[Grid]
    evaluation: EvaluationSpec = field(default_factory=lambda: EvaluationSpec(dense=False))
    execution: Execution = field(default_factory=Execution)
    dtype: str = "auto"
    revision: str | None = None

    def requests(self) -> list[tuple[Cell, bool, list[str]]]:
        """Each distinct cell once: (cell, zero-shot wanted, names of the grids holding it)."""
        order: dict[Cell, tuple[bool, list[str]]] = {}
        for grid in self.grids:
            for cell in grid.cells:
                wanted, names = order.get(cell, (False, []))
                order[cell] = (wanted or grid.zeroshot, [*names, grid.name])
        return [(cell, wanted, names) for cell, (wanted, names) in order.items()]

    def key(self, cell: Cell) -> str:
        return cell.key(self.model, self.revision, self.dtype)

    def job(self, cell: Cell, zeroshot: bool) -> Job:
        """The cell as a job of the one run path (the dense cell: evaluation only)."""
        evaluation = replace(self.evaluation, dense=False,
                             zeroshot=self.evaluation.zeroshot if zeroshot else ())
        steps = () if cell.method == DENSE else (cell.settings(),)
        calibration = cell.calibration_spec
        return Job(model=self.model, steps=steps, calibration=calibration,
                   evaluation=evaluation, execution=self.execution,
                   output=OutputSpec(samples=False), dtype=self.dtype, revision=self.revision)


SWEEP_KEYS = ("model", "revision", "dtype", "defaults", "evaluation", "batch_size", "grids")


def load_plan(path: str | Path, model: str | None = None) -> SweepPlan:
    """A sweep file: ``{"model", "defaults", "evaluation", "grids": [{"name", "zeroshot",
    <axis>: [values]}]}`` (JSON). Relative data paths are taken from the current directory.
    Unknown keys are refused in one line."""
    path = Path(path)
    if not path.is_file():
        raise SnapPruneError(f"sweep file {path} not found")
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SnapPruneError(f"cannot read sweep file {path}: {exc}") from exc
    if not isinstance(spec, dict):
        raise SnapPruneError(f"sweep file {path} must hold one JSON object")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise SnapPruneError(f"sweep file {path}: unknown key(s) {unknown}; use "
                             f"{', '.join(SWEEP_KEYS)}")
    model = model or spec.get("model")
    if not model:
        raise SnapPruneError(f"sweep file {path} names no model; pass --model")
    defaults = spec.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - set(LIST_AXES):
        raise SnapPruneError(f"sweep file {path}: defaults must map settings among "
                             f"{', '.join(LIST_AXES)}")
    evaluation = spec.get("evaluation", {})
    if isinstance(evaluation, dict) and "eval_seqlen" in evaluation:  # the older spelling
        evaluation = {("seqlen" if k == "eval_seqlen" else k): v for k, v in evaluation.items()}
    evaluation = replace(section(EvaluationSpec, evaluation, f"sweep file {path.name} "
                                  "evaluation"), dense=False)
    grids = []
    for number, grid in enumerate(spec.get("grids", []), 1):
        if not isinstance(grid, dict):
            raise SnapPruneError(f"sweep file {path}: grid {number} is not an object")
        grid = dict(grid)
        name = grid.pop("name", f"grid{number}")
        zeroshot = bool(grid.pop("zeroshot", False))
        grids.append(expand_grid(name, grid, defaults, zeroshot))
    if not grids:
        raise SnapPruneError(f"sweep file {path} has no grids")
    batch_size = spec.get("batch_size", Execution.batch_size)
    return SweepPlan(model, grids, evaluation, Execution(batch_size=batch_size),
                     dtype=spec.get("dtype", "auto"), revision=spec.get("revision"))


def read_cells(out_dir: str | Path) -> dict[str, dict]:
    """Finished cells by key; a line cut short by an interruption is ignored."""
    path = Path(out_dir) / CELLS_FILE
    records: dict[str, dict] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "key" in record:
            records[record["key"]] = record
    return records


def covers(record: dict, evaluation: dict) -> bool:
    """Whether a finished cell was evaluated at least as asked."""
    done = record.get("evaluation", {})
    if done.get("ppl") != evaluation["ppl"]:
        return False
    return "zeroshot" not in evaluation or done.get("zeroshot") == evaluation["zeroshot"]


def append_record(out_dir: Path, record: dict) -> None:
    """One line per cell (strict JSON), flushed to disk before the next cell starts."""
    path = out_dir / CELLS_FILE
    with path.open("a+", encoding="utf-8") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell():
            handle.seek(handle.tell() - 1)
            if handle.read(1) != "\n":  # an earlier run died mid-line
                handle.write("\n")
        handle.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


class DenseWeights:
    """The dense values of the layers a sweep prunes, to restore between cells."""

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        self._saved = [(m, m.weight.detach().clone()) for m in modules]

    @torch.no_grad()
    def restore(self) -> None:
        for module, weight in self._saved:
            module.weight.copy_(weight)


def cell_results(outcome) -> dict:
    """A finished cell's results, from the run path's outcome."""
    result: dict = {}
    run = outcome.run
    if run is not None:
        mean = mean_layer_error(run.layers)
        result.update(
            achieved_sparsity=run.achieved_sparsity,
            timing={"pruning_seconds": run.total_seconds,
                    "calibration_forward_seconds": run.calibration_seconds,
                    "solver_seconds": run.solver_seconds,
                    "calibration_data_seconds": run.data_seconds},
            mean_layer_error=mean,
            layer_errors={r.name: r.error for r in run.layers} if mean is not None else {},
        )
        raised = {r.name: r.percdamp for r in run.layers
                  if r.percdamp is not None and r.percdamp != run.settings.percdamp}
        if raised:
            result["raised_damping"] = raised
    result["perplexity"] = {source_label(k): v.perplexity
                            for k, v in outcome.evaluated.perplexity.items()}
    if outcome.evaluated.zeroshot is not None:
        result["zeroshot"] = outcome.evaluated.zeroshot
    return result


def run_sweep(
    plan: SweepPlan,
    out_dir: str | Path,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
    model_and_tokenizer: tuple | None = None,
    after_cell: Callable[[dict[str, dict]], None] | None = None,
) -> dict[str, dict]:
    """Run every cell of ``plan`` not already finished in ``out_dir``; return all records.

    ``model_and_tokenizer`` skips loading ``plan.model`` (tests, notebooks); the model's
    weights are restored to their dense values after the sweep. ``after_cell`` sees all
    records after each finished cell (to refresh a report).
    """
    from .models.targets import target_layers
    from .report import device_description, library_versions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = read_cells(out_dir)
    requests = plan.requests()
    todo = [(cell, zs, names) for cell, zs, names in requests
            if not (plan.key(cell) in done
                    and covers(done[plan.key(cell)], describe_evaluation(plan.evaluation, zs)))]
    log(f"sweep: {len(requests)} cells, {len(requests) - len(todo)} already "
        f"finished in {out_dir / CELLS_FILE}, {len(todo)} to run")
    if not todo:
        return done
    execution = plan.execution
    if model_and_tokenizer is None:
        from .models.loading import load_model

        model, tokenizer, _ = load_model(plan.model, dtype=plan.dtype, revision=plan.revision,
                                         progress=progress)
    else:
        model, tokenizer = model_and_tokenizer
    layers = target_layers(model)
    dense = DenseWeights(m for named in layers.values() for m in named.values())
    bench = Workbench(model, tokenizer, device=execution.device, progress=progress)
    # Every data source is read (and 'self' text generated) from the dense model up front.
    for cell, _, _ in todo:
        if cell.calibration_key is not None:
            bench.calibration_ids(cell.calibration_spec)
    versions = library_versions()
    device = device_description(execution.device)
    try:
        for number, (cell, zeroshot, names) in enumerate(todo, 1):
            log(f"sweep cell {number}/{len(todo)} [{', '.join(names)}]: {describe_cell(cell)}")
            dense.restore()
            t = time.perf_counter()
            outcome = execute(plan.job(cell, zeroshot), None, bench=bench, progress=progress,
                              announce=False)
            result = cell_results(outcome)
            record = {"key": plan.key(cell), "cell": asdict(cell), "grids": names,
                      "evaluation": describe_evaluation(plan.evaluation, zeroshot),
                      "model": plan.model, "revision": plan.revision,
                      "dtype": str(model.dtype).removeprefix("torch."),
                      "device": device, "deterministic": execution.deterministic,
                      "batch_size": execution.batch_size, **result,
                      "cell_seconds": time.perf_counter() - t,
                      "versions": versions, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            append_record(out_dir, record)
            done[record["key"]] = record
            if after_cell:
                after_cell(done)
            log("  " + ", ".join(f"ppl {k} {v:.3f}" for k, v in result["perplexity"].items()))
    finally:
        dense.restore()
    return done


def describe_cell(cell: Cell) -> str:
    """Short human label: ``thanos 2:4 B=128 metric=wanda c4×32×512``."""
    if cell.method == DENSE:
        return DENSE
    parts = [cell.method, cell.pattern]
    if cell.pattern == "unstructured" or cell.pattern == "structured":
        parts.append(f"{cell.sparsity:g}")
    if cell.alpha is not None:
        parts.append(f"α={cell.alpha:g}")
    if cell.blocksize is not None:
        parts.append(f"B={cell.blocksize}")
    parts.append(f"metric={cell.metric}")
    if cell.calib is not None:
        parts.append(f"{Path(cell.calib).name}×{cell.nsamples}×{cell.seqlen}")
    return " ".join(parts)


def cell_from_record(record: dict) -> Cell:
    known = {f.name for f in fields(Cell)}
    return Cell(**{k: v for k, v in record["cell"].items() if k in known})
