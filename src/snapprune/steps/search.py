"""The ``search`` step: the structure that fits a budget (parameters, GGUF bytes or decode
speed) with the least calibration loss, found by trying it — whole blocks, attention
sub-layers and MLP neurons removed in several proportions (``models.structure_budget``
counts them), each structure cut and repaired by the ``prune-depth`` and ``shrink`` steps on a
copy of the model and scored on calibration windows it was not cut on. The frontier it
explored is logged, reported and plotted (``search.png``); the best structure replaces the
model."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..engine.mixes import PLAIN_EMBEDDING_TYPE
from ..errors import SnapPruneError
from ..flags import Command, Flag, fraction, number, positive_int
from ..models import decilm
from ..models.records import RunRecord
from ..models.search_settings import SearchSettings
from ..models.settings import DEPTH_SCORES, WIDTH_ALLOCATIONS, DepthSettings, ShrinkSettings
from ..models.structure_budget import Budget, Cost, Geometry, Structure, geometry, grid
from .base import EstimatePart, Probe, Step, StepContext, step_for

MB = 1_000_000
HELD_OUT_SEED = 1_000
"""Added to the calibration seed for the windows candidates are scored on."""

EPILOG = """\
search finds the smaller structure worth running: it removes whole decoder blocks, attention
sub-layers and MLP neurons in several proportions that all meet one budget, cuts and repairs
each on a copy of the model (prune-depth and shrink, in closed form), scores each by its loss
on calibration windows it was not cut on, and keeps the best. The budget, one of:
  --target-params N   parameters (a count, or a fraction of the model's below 1)
  --target-size MB    the GGUF file with every decoder matrix at --gguf-type (default: the
                      type of a quantize step in the same recipe, else q4_0), the
                      embedding and output matrix at --embedding-type (default: q8_0; a
                      4-bit embedding leaves far more of a small model's blocks)
  --target-decode X   X times the dense model's decode speed, by the bytes read per token
                      at that type (what bounds decoding on a memory-bound machine)
It tries --points counts of removed blocks (from none to what depth alone needs) and, for
each, --points counts of removed attention sub-layers (from none to what the rest needs); the
MLP width fills what the budget leaves. Blocks without attention are written as llama.cpp's deci
GGUF (--format gguf) or, with --multiple-of 256, as the Nemotron-NAS layout (--format hf, which
vLLM reads); otherwise the search keeps every attention sub-layer. The frontier it explored is
printed, in the report (search) and in search.png.

example:
  snapprune search --model smollm2-135m --target-params 0.8 --out runs/smollm2-p80
  snapprune search --model smollm2-135m --target-size 73 --gguf-type q4_0 --format gguf \\
      --out runs/smollm2-73mb
  quantised in the same job, a recipe (snapprune run search.yaml --out runs/73mb-q4):
    model: smollm2-135m
    steps:
      - search: {target_size: 73, gguf_type: q4_0}
      - quantize: {scheme: q4_0}
    output: {format: gguf}
"""


@dataclass
class Tried:
    """One structure the search cut and scored."""

    structure: Structure
    cost: Cost
    loss: float = math.nan
    seconds: float = 0.0
    steps: dict = field(default_factory=dict)
    """Its steps' report sections (``prune-depth``, ``shrink``)."""

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows past ~709

    def describe(self, units: int) -> str:
        parts = [f"-{self.structure.blocks} blocks" if self.structure.blocks else "",
                 f"-{self.structure.attention} attention" if self.structure.attention else "",
                 f"-{self.structure.heads} heads per group" if self.structure.heads else "",
                 f"MLP {self.structure.width}/{units}" if self.structure.width < units else ""]
        return ", ".join(p for p in parts if p) or "dense"


@dataclass(kw_only=True)
class SearchRun(RunRecord):
    settings: SearchSettings
    budget: Budget
    counted_as: str | None
    geometry: Geometry
    tried: list[Tried] = field(default_factory=list)
    chosen: int = -1
    notes: list[str] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0

    @property
    def best(self) -> Tried:
        return self.tried[self.chosen]


class SearchStep(Step):
    name = "search"
    settings_type = SearchSettings
    order = 4
    label = "searched"
    verb = "search a structure"
    removes_weights = True
    changes = frozenset({"blocks", "shapes"})
    records_layers = False
    single_process = "search tries its structures in one process; run it without torchrun"
    command = Command(
        "search", help="the smaller structure (depth, attention, MLP width) that fits a "
                       "budget with the least loss",
        description="Try several structures that fit one budget (parameters, GGUF size or "
                    "decode speed), cut and repair each, keep the one with the least "
                    "calibration loss.",
        epilog=EPILOG, what="the search", first_group="the budget",
        groups=("calibration", "evaluation", "output"))
    flags = (
        Flag("target_params", ("--target-params",), "parameters to keep: a count, or a "
             "fraction of the model's below 1", type=number, metavar="N", show_default=False),
        Flag("target_size", ("--target-size",), "GGUF megabytes (10^6) with the decoder at "
             "--gguf-type", type=number, metavar="MB", show_default=False),
        Flag("target_decode", ("--target-decode",), "decode speed-up over the dense model, by "
             "the bytes read per token", type=number, metavar="X", show_default=False),
        Flag("gguf_type", ("--gguf-type",), "the llama.cpp type sizes are counted in (default: "
             "a quantize step's type in the same recipe, else q4_0)", metavar="TYPE",
             show_default=False),
        Flag("embedding_type", ("--embedding-type",), "the llama.cpp type the token embedding "
             "and output matrix are counted in (default: a quantize step's --embedding-type in "
             "the same recipe, else q8_0)", metavar="TYPE", show_default=False),
        Flag("method", ("--method",), "how the MLP neurons are chosen and the rest updated",
             metavar="NAME"),
        Flag("score", ("--score",), "how blocks are ranked: " + ", ".join(DEPTH_SCORES),
             choices=DEPTH_SCORES),
        Flag("allocation", ("--allocation",), "MLP widths: uniform, or per block by measured "
             "sensitivity (--format gguf, or hf with --multiple-of 256)",
             choices=WIDTH_ALLOCATIONS),
        Flag("points", ("--points",), "removed-block counts tried, and removed-attention counts "
             "for each", type=positive_int, metavar="K"),
        Flag("attention", ("--no-attention",), "keep every attention sub-layer (remove blocks "
             "and neurons only)", action="store_false", show_default=False),
        Flag("heads", ("--heads",), "also try cutting 1 … all but one query heads per "
             "key/value group (each with the widest MLP the rest allows)",
             action="store_true", show_default=False),
        Flag("max_mlp", ("--max-mlp",), "the most of the MLP neurons a structure removes",
             type=fraction, metavar="F"),
        Flag("windows", ("--windows",), "held-out calibration windows each structure is "
             "scored on", type=positive_int, metavar="K"),
        Flag("multiple_of", ("--multiple-of",), "MLP widths step by K neurons (256 lets --format "
             "hf hold blocks without attention: the Nemotron-NAS layout)",
             type=positive_int, metavar="K"),
    )

    def check(self, settings: SearchSettings, job) -> None:
        settings.check()
        taken = [k for k in ("prune-depth", "shrink") if job.settings(k) is not None]
        if taken:
            raise SnapPruneError(f"search chooses the depth and the widths itself; drop "
                                 f"{' and '.join(taken)} from the job")
        fmt = job.output.format if job.output is not None else None
        if settings.allocation == "sensitivity":  # deci GGUF or Nemotron-NAS
            decilm.check_requested(fmt, multiple_of=settings.multiple_of)
        if settings.target_size is not None and fmt not in (None, "gguf"):
            raise SnapPruneError("--target-size counts a GGUF file: write --format gguf, or "
                                 "give --target-params")

    def check_model(self, settings: SearchSettings, job, model) -> None:
        _plan(settings, job, model)

    def estimate_layers(self, settings: SearchSettings, model) -> dict[str, float | None]:
        """The MLP's output projection: the estimate times a calibration pass and its cut."""
        from ..models.adapters import adapter_for

        adapter = adapter_for(model)
        return {adapter.mlp_groups(adapter.decoder_blocks(model)[0])[0][1]: None}

    def estimate(self, settings: SearchSettings, probe: Probe) -> EstimatePart:
        """Per structure: about three calibration passes (the block scores, the repair, the
        width statistics), the width cut's solve, and the held-out windows' pass."""
        from ..engine import prune_weight
        from ..models.layout import linear_weight

        _, structures = _plan(settings, probe.job, probe.model)
        (name,) = self.estimate_layers(settings, probe.model)
        t = time.perf_counter()
        prune_weight(linear_weight(probe.layers[name]).clone(),
                     probe.stats and probe.stats[name], method=settings.method,
                     pattern="structured", sparsity=0.3)
        solve = time.perf_counter() - t
        n = len(structures)
        nsamples = probe.job.calibration.nsamples or 1
        return EstimatePart(solver_seconds=n * solve,
                            passes=n * (3 + settings.windows / nsamples) - 1)

    def apply(self, settings: SearchSettings, context: StepContext, fused=None):
        start = time.perf_counter()
        job, bench = context.job, context.bench
        run, structures = _plan(settings, job, bench.model)
        dense = bench.model
        run.parameters_before = sum(p.numel() for p in dense.parameters())
        held_out = _held_out(bench, job, settings)
        context.log(f"search: {len(structures)} structures within {_said(run)}")
        for structure in structures:
            tried = Tried(structure, run.geometry.cost(structure))
            t = time.perf_counter()
            model, tried.steps = _cut(structure, settings, context, dense, run.geometry)
            tried.loss = _loss(model, held_out, bench.device)
            del model  # one candidate alive at a time: the best is cut again below
            tried.seconds = time.perf_counter() - t
            run.tried.append(tried)
            context.log(f"  {tried.describe(run.geometry.units):40s} "
                        f"{tried.cost.params:>13,} params  loss {tried.loss:.4f} "
                        f"(ppl {tried.perplexity:.2f})  {tried.seconds:.0f}s")
            if run.chosen < 0 or tried.loss < run.best.loss:
                run.chosen = len(run.tried) - 1
        # The cut is deterministic given the job: the best structure again, now for good.
        bench.model, _ = _cut(run.best.structure, settings, context, dense, run.geometry)
        del dense
        run.parameters_after = sum(p.numel() for p in bench.model.parameters())
        run.total_seconds = time.perf_counter() - start
        return run

    def log_line(self, run, *, fused: bool = False) -> str:
        return (f"searched {len(run.tried)} structures: best "
                f"{run.best.describe(run.geometry.units)} (loss {run.best.loss:.4f}), "
                f"{run.parameters_before:,} -> {run.parameters_after:,} parameters in "
                f"{run.total_seconds:.1f}s")

    def summary(self, run) -> str:
        return (f"search ({_said(run)}): {run.best.describe(run.geometry.units)} of "
                f"{len(run.tried)} structures tried (held-out calibration ppl "
                f"{run.best.perplexity:.2f}); parameters {run.parameters_before:,} → "
                f"{run.parameters_after:,} "
                f"(-{1 - run.parameters_after / max(1, run.parameters_before):.1%})")

    def report(self, run) -> dict:
        units = run.geometry.units
        return {"method": run.settings.method, "pattern": "structure",
                "settings": {k: getattr(run.settings, k) for k in (
                    "target_params", "target_size", "target_decode", "gguf_type",
                    "embedding_type", "score",
                    "allocation", "points", "attention", "heads", "max_mlp", "windows")},
                "search": {
                    "budget": {"currency": run.budget.currency, "limit": run.budget.limit,
                               "counted_as": run.counted_as},
                    "dense": vars(run.geometry.dense), "notes": run.notes,
                    "chosen": run.chosen,
                    "tried": [{"blocks_removed": t.structure.blocks,
                               "attention_removed": t.structure.attention,
                               "heads_removed_per_group": t.structure.heads,
                               "heads_per_group_dense": run.geometry.per_group,
                               "mlp_width": t.structure.width, "mlp_width_dense": units,
                               "structure": t.describe(units), **vars(t.cost),
                               "loss": t.loss, "perplexity": t.perplexity,
                               "seconds": t.seconds, "steps": t.steps} for t in run.tried]}}

    def files(self, run, directory: Path) -> list[str]:
        return ["search.png"] if _plot(run, directory / "search.png") else []


def _plan(settings: SearchSettings, job, model) -> tuple[SearchRun, list[Structure]]:
    """The budget and the structures to try, or a one-line refusal before any work."""
    from .quantize import metadata_bytes

    currency, value = settings.target
    quantize = job.settings("quantize")
    scheme = quantize.parsed_scheme if quantize is not None else None
    counted = None
    embedding = settings.embedding_counting_type(
        quantize.embedding_type if quantize is not None else None)
    if currency != "params":
        counted = settings.counting_type(quantize.scheme if quantize is not None else None)
        if settings.gguf_type is None and quantize is not None and (
                quantize.parsed_mix is not None or quantize.sized or not scheme.gguf
                or scheme.block is None):
            raise SnapPruneError(
                f"the size and decode targets are counted in one llama.cpp block type, and "
                f"{quantize.scheme} is not one: give --gguf-type (q4_0, q8_0, ...)")
    # widths the job's quantisation groups divide (w4g128 needs multiples of 128)
    group = scheme.group_size if scheme is not None and not scheme.gguf else None
    multiple = math.lcm(settings.multiple_of, group or 1)
    fmt = job.output.format if job.output is not None else None
    measured = geometry(model, counted, multiple_of=multiple,
                        metadata=metadata_bytes(job) if currency == "bytes" else 0,
                        embedding=embedding)
    dense = measured.dense
    if currency == "params":
        limit = int(value * dense.params) if value < 1 else int(value)
    elif currency == "bytes":
        limit = int(value * MB)
    else:
        limit = int(dense.read / value)
    if limit >= getattr(dense, currency):
        raise SnapPruneError(
            f"the target ({currency} {limit:,}) is not below the dense model's "
            f"({getattr(dense, currency):,}): nothing to remove; give a smaller target")
    notes = []
    attention = settings.attention
    if attention and not _holds_attention_free(fmt, measured, model):
        attention = False
        notes.append(f"every attention sub-layer kept: blocks without attention need --format "
                     f"gguf, or --format hf (the Nemotron-NAS layout) with MLP widths in "
                     f"multiples of {decilm.WIDTH_MULTIPLE} (--multiple-of "
                     f"{decilm.WIDTH_MULTIPLE}); not {fmt} with steps of {measured.step}")
    budget = Budget(currency, limit)
    narrowest = max(measured.step, math.ceil(measured.units * (1 - settings.max_mlp)
                                             / measured.step) * measured.step)
    heads = settings.heads
    if heads and settings.allocation == "sensitivity" and fmt not in (None, "gguf"):
        heads = False
        notes.append("no query head cut: per-block head counts need --format gguf")
    if heads and not measured.head.params:
        heads = False
        notes.append("no query head cut: this family's heads are not cut out by shrink, or "
                     "they are not whole blocks of the counted type")
    # a head cut leaves heads that no longer fill the hidden size, which the Nemotron-NAS
    # layout (hf for blocks without attention) cannot hold: there, not both in one structure
    structures = grid(measured, budget, points=settings.points, attention=attention,
                      narrowest=narrowest, heads=heads,
                      heads_with_attention=fmt in (None, "gguf"))
    if counted is not None and embedding != PLAIN_EMBEDDING_TYPE:
        counted = f"{counted}, embedding {embedding}"
    run = SearchRun(settings=settings, budget=budget, counted_as=counted, geometry=measured,
                    notes=notes)
    return run, structures


def _holds_attention_free(fmt: str | None, measured, model) -> bool:
    """Whether the output can hold blocks without attention: llama.cpp's deci GGUF always,
    the Nemotron-NAS layout where every width the search may cut to is a multiple of 256."""
    if fmt in (None, "gguf"):
        return True
    if fmt != "hf" or measured.step % decilm.WIDTH_MULTIPLE:
        return False
    try:
        decilm.check_model(model, multiple_of=measured.step)
    except SnapPruneError:
        return False
    return True


def _said(run: SearchRun) -> str:
    budget = run.budget
    if budget.currency == "params":
        return f"{budget.limit:,} parameters"
    if budget.currency == "bytes":
        return f"{budget.limit / MB:.1f} MB at {run.counted_as}"
    return (f"{run.geometry.dense.read / budget.limit:.2f}x decode ({budget.limit / MB:.1f} MB "
            f"read per token at {run.counted_as})")


def _held_out(bench, job, settings: SearchSettings):
    """Calibration windows drawn with another seed: what each structure is scored on."""
    spec = replace(job.calibration, nsamples=settings.windows,
                   seed=job.calibration.seed + HELD_OUT_SEED)
    ids, _ = bench.calibration_ids(spec)
    return ids


def _cut(structure: Structure, settings: SearchSettings, context: StepContext, dense,
         measured: Geometry):
    """A copy of the dense model cut to ``structure`` by the prune-depth and shrink steps
    (through the run path, as a job of those steps), and their report sections."""
    from ..jobs import EvaluationSpec, OutputSpec

    job, bench = context.job, context.bench
    steps = []
    if structure.blocks or structure.attention:
        steps.append(DepthSettings(blocks=structure.blocks, attention=structure.attention,
                                   score=settings.score))
    if structure.width < measured.units or structure.heads:
        steps.append(ShrinkSettings(settings.method, mlp=1 - structure.width / measured.units,
                                    heads=structure.heads / measured.per_group,
                                    multiple_of=measured.step, allocation=settings.allocation))
    candidate = bench.sibling(copy.deepcopy(dense))
    fmt = "gguf" if job.output is not None and job.output.format == "gguf" else "hf"
    output = replace(job.output or OutputSpec(), format=fmt, samples=False)  # nothing saved
    sub = replace(job, steps=tuple(steps), evaluation=EvaluationSpec(ppl=(), dense=False),
                  output=output)
    outcome = context.execute(sub, None, bench=candidate, progress=False, announce=False)
    sections = {r.step.name: step_for(r.settings).report(r.run) for r in outcome.results}
    return outcome.model, sections


def _loss(model, ids, device) -> float:
    """Mean next-token loss on the held-out windows (the model on the device meanwhile);
    infinite for a structure whose outputs are not finite, which then loses, not the run."""
    from ..eval.perplexity import perplexity
    from ..placement import placed

    try:
        with placed(model, device):
            result = perplexity(model, ids.reshape(-1), seqlen=ids.shape[1], device=device,
                                progress=False)
    except SnapPruneError:
        return math.inf
    return math.log(result.perplexity)


def _plot(run: SearchRun, path: Path) -> bool:
    """Loss against the budget's currency, every structure tried, the chosen one marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    currency = run.budget.currency
    scale = 1e6
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in run.tried:
        x = getattr(t.cost, currency) / scale
        kind = ("depth + attention + width" if t.structure.attention and t.structure.blocks
                else "attention + width" if t.structure.attention
                else "depth + width" if t.structure.blocks else "width")
        marker = {"width": "o", "depth + width": "s", "attention + width": "^"}.get(kind, "D")
        ax.scatter(x, t.perplexity, marker=marker, color="tab:blue")
        ax.annotate(t.describe(run.geometry.units), (x, t.perplexity), fontsize=7,
                    xytext=(4, 2), textcoords="offset points")
    best = run.best
    ax.scatter(getattr(best.cost, currency) / scale, best.perplexity, s=160,
               facecolors="none", edgecolors="tab:red", label="chosen")
    ax.axvline(run.budget.limit / scale, color="grey", ls=":", lw=1, label="budget")
    ax.set_xlabel({"params": "parameters (M)", "bytes": f"GGUF MB at {run.counted_as}",
                   "read": f"MB read per token at {run.counted_as}"}[currency])
    ax.set_ylabel("held-out calibration perplexity")
    ax.set_title("structures tried by snapprune search")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
