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
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from .engine import check_settings, get_method
from .errors import SnapPruneError
from .models.pipeline import PruneSettings
from .run import CalibrationSpec, EvaluationSpec, Job, Workbench, check_evaluation

CELLS_FILE = "cells.jsonl"
DENSE = "dense"
LIST_AXES = ("method", "pattern", "sparsity", "alpha", "blocksize", "metric", "percdamp",
             "calib", "nsamples", "seqlen", "seed")
DEFAULTS = {"pattern": "unstructured", "sparsity": 0.5, "alpha": 0.0, "blocksize": 128,
            "metric": None, "percdamp": 0.01, "calib": "c4", "nsamples": 128, "seqlen": 2048,
            "seed": 0}


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

    @property
    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    @property
    def calibration_key(self) -> tuple | None:
        if self.calib is None:
            return None
        return (self.calib, self.nsamples, self.seqlen, self.seed)

    def job(self, evaluation: EvaluationSpec, batch_size: int, activations: str = "auto") -> Job:
        """The cell as a run of the shared run path (``None`` settings back to defaults)."""
        settings = PruneSettings(
            method=self.method, pattern=self.pattern, sparsity=self.sparsity,
            alpha=self.alpha or 0.0, blocksize=self.blocksize or DEFAULTS["blocksize"],
            percdamp=self.percdamp or DEFAULTS["percdamp"], metric=self.metric)
        return Job(settings, self.calibration_spec, evaluation, batch_size, activations)

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
    # A grid may cross α with several patterns: α only exists for the structured one.
    alpha = s["alpha"] if parse_pattern(s["pattern"]).kind == "structured" else 0.0
    pattern, sparsity = check_settings(method, s["pattern"], _sparsity_for(s), alpha,
                                       int(s["blocksize"]), s["metric"])
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


@dataclass
class Evaluation:
    """Fixed evaluation budget of a sweep: every cell is measured the same way."""

    ppl: list[str] = field(default_factory=list)
    eval_seqlen: int = 2048
    max_windows: int | None = None
    zeroshot: list[str] = field(default_factory=list)
    limit: int | None = None

    def spec(self, with_zeroshot: bool) -> EvaluationSpec:
        return EvaluationSpec(ppl=tuple(self.ppl), seqlen=self.eval_seqlen,
                              max_windows=self.max_windows,
                              zeroshot=tuple(self.zeroshot) if with_zeroshot else (),
                              limit=self.limit)

    def describe(self, with_zeroshot: bool) -> dict:
        out = {"ppl": {source_label(s): {
            "seqlen": self.eval_seqlen, "max_windows": self.max_windows} for s in self.ppl}}
        if with_zeroshot and self.zeroshot:
            out["zeroshot"] = {"tasks": [Path(t).stem for t in self.zeroshot],
                               "limit": self.limit}
        return out


@dataclass
class SweepPlan:
    model: str
    grids: list[Grid]
    evaluation: Evaluation
    batch_size: int = 8
    activations: str = "auto"

    def requests(self) -> list[tuple[Cell, bool, list[str]]]:
        """Each distinct cell once: (cell, zero-shot wanted, names of the grids holding it)."""
        order: dict[Cell, tuple[bool, list[str]]] = {}
        for grid in self.grids:
            for cell in grid.cells:
                wanted, names = order.get(cell, (False, []))
                order[cell] = (wanted or grid.zeroshot, [*names, grid.name])
        return [(cell, wanted, names) for cell, (wanted, names) in order.items()]


def load_plan(path: str | Path, model: str | None = None) -> SweepPlan:
    """A sweep file: ``{"model", "defaults", "evaluation", "grids": [{"name", "zeroshot",
    <axis>: [values]}]}`` (JSON). Relative data paths are taken from the current directory."""
    path = Path(path)
    if not path.is_file():
        raise SnapPruneError(f"sweep file {path} not found")
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SnapPruneError(f"cannot read sweep file {path}: {exc}") from exc
    model = model or spec.get("model")
    if not model:
        raise SnapPruneError(f"sweep file {path} names no model; pass --model")
    defaults = spec.get("defaults", {})
    evaluation = Evaluation(**spec.get("evaluation", {}))
    grids = []
    for number, grid in enumerate(spec.get("grids", []), 1):
        grid = dict(grid)
        name = grid.pop("name", f"grid{number}")
        zeroshot = bool(grid.pop("zeroshot", False))
        grids.append(expand_grid(name, grid, defaults, zeroshot))
    if not grids:
        raise SnapPruneError(f"sweep file {path} has no grids")
    return SweepPlan(model, grids, evaluation, int(spec.get("batch_size", 8)))


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
    """One line per cell, flushed to disk before the next cell starts."""
    path = out_dir / CELLS_FILE
    with path.open("a+", encoding="utf-8") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell():
            handle.seek(handle.tell() - 1)
            if handle.read(1) != "\n":  # an earlier run died mid-line
                handle.write("\n")
        handle.write(json.dumps(record) + "\n")
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


def run_cell(bench: Workbench, cell: Cell, zeroshot: bool, plan: SweepPlan) -> dict:
    """Prune the (dense) model on ``bench`` as ``cell`` says, evaluate it, return the record's
    results. The dense cell is evaluated only."""
    job = cell.job(plan.evaluation.spec(zeroshot), plan.batch_size, plan.activations)
    result: dict = {}
    if cell.method == DENSE:
        evaluated = bench.evaluate(job.evaluation)
    else:
        outcome = bench.run(job)
        run, evaluated = outcome.run, outcome.evaluated
        errors = [r.error for r in run.layers if math.isfinite(r.error)]
        result.update(
            achieved_sparsity=run.achieved_sparsity,
            timing={"pruning_seconds": run.total_seconds,
                    "calibration_forward_seconds": run.calibration_seconds,
                    "solver_seconds": run.solver_seconds,
                    "calibration_data_seconds": outcome.calibration_data_seconds},
            mean_layer_error=sum(errors) / len(errors) if errors else None,
            layer_errors={r.name: r.error for r in run.layers} if errors else {},
        )
        raised = {r.name: r.percdamp for r in run.layers
                  if r.percdamp is not None and r.percdamp != job.settings.percdamp}
        if raised:
            result["raised_damping"] = raised
    result["perplexity"] = {source_label(k): v.perplexity
                            for k, v in evaluated.perplexity.items()}
    if evaluated.zeroshot is not None:
        result["zeroshot"] = evaluated.zeroshot
    return result


def run_sweep(
    plan: SweepPlan,
    out_dir: str | Path,
    *,
    device: str = "cpu",
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
    from .models.pipeline import target_layers
    from .report import library_versions

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = read_cells(out_dir)
    requests = plan.requests()
    todo = [(cell, zs, names) for cell, zs, names in requests
            if not (cell.key in done
                    and covers(done[cell.key], plan.evaluation.describe(zs)))]
    log(f"sweep: {len(requests)} cells, {len(requests) - len(todo)} already "
        f"finished in {out_dir / CELLS_FILE}, {len(todo)} to run")
    if not todo:
        return done
    if model_and_tokenizer is None:
        from .models.loading import load_model

        model, tokenizer, _ = load_model(plan.model, progress=progress)
    else:
        model, tokenizer = model_and_tokenizer
    check_evaluation(plan.evaluation.spec(True))
    layers = target_layers(model, PruneSettings())
    dense = DenseWeights(m for named in layers.values() for m in named.values())
    bench = Workbench(model, tokenizer, device=device, progress=progress)
    # Every data source is read (and 'self' text generated) from the dense model up front.
    for cell, _, _ in todo:
        if cell.calibration_key is not None:
            bench.calibration_ids(cell.calibration_spec)
    versions = library_versions()
    try:
        for number, (cell, zeroshot, names) in enumerate(todo, 1):
            log(f"sweep cell {number}/{len(todo)} [{', '.join(names)}]: {describe_cell(cell)}")
            dense.restore()
            t = time.perf_counter()
            result = run_cell(bench, cell, zeroshot, plan)
            record = {"key": cell.key, "cell": asdict(cell), "grids": names,
                      "evaluation": plan.evaluation.describe(zeroshot), "model": plan.model,
                      **result, "cell_seconds": time.perf_counter() - t,
                      "versions": versions, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            append_record(out_dir, record)
            done[cell.key] = record
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
