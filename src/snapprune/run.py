"""One run path: calibrate → prune → evaluate, for ``prune``, every ``sweep`` cell and what
builds on them.

A ``Job`` is the whole request in one immutable object. A ``Workbench`` holds one loaded model
and what several jobs on it can share (tokenised calibration sets, the first block's inputs,
tokenised evaluation text). The device contract lives here and in ``prune_model``: the model
stays where it was loaded (CPU); pruning moves one block at a time to the device and back, and
evaluation moves the model to the device for the evaluation only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import LOCAL_FIX, NAMED_SOURCES
from .errors import SnapPruneError
from .eval.perplexity import PerplexityResult, capped_seqlen, perplexity
from .hub import require_hub
from .models.adapters import adapter_for
from .models.pipeline import (
    BlockInputs,
    PruneRun,
    PruneSettings,
    capture_block_inputs,
    check_model_for_pruning,
    prune_model,
    target_layers,
)
from .models.width import ShrinkRun, WidthSettings, plan_width, shrink_model

CALIBRATION_NAMES = ("c4", "wikitext2", "self")


@dataclass(frozen=True)
class CalibrationSpec:
    source: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0


@dataclass(frozen=True)
class EvaluationSpec:
    """What every evaluated model is measured on: perplexity sources and zero-shot tasks."""

    ppl: tuple[str, ...] = ()
    seqlen: int = 2048
    max_windows: int | None = None
    zeroshot: tuple[str, ...] = ()
    limit: int | None = None

    @property
    def empty(self) -> bool:
        return not self.ppl and not self.zeroshot


@dataclass(frozen=True)
class Job:
    """One pruning run: settings (zeros in place, or whole units cut out), calibration data,
    evaluation, and how to execute it (batch size, where activations live, whether layer errors
    are measured), which changes speed and memory, not the pruned weights."""

    settings: PruneSettings | WidthSettings
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    batch_size: int = 8
    activations: str = "auto"
    layer_errors: bool = True

    def validate(self) -> None:
        """Everything that can be refused without the model, refused before it is loaded."""
        self.settings.check()
        if self.settings.needs_calibration:
            check_source(self.calibration.source, CALIBRATION_NAMES, "calibration source")
        check_evaluation(self.evaluation)


def check_source(source: str, named: tuple[str, ...], what: str) -> None:
    """A named source must be reachable (the Hub, asked once, in seconds), a path must exist."""
    if source in named:
        if source != "self":
            require_hub(f"{what} {source!r}", LOCAL_FIX)
        return
    if not Path(source).exists():
        raise SnapPruneError(
            f"{what} {source!r} not found: use {', '.join(named)} or a path to an existing file"
        )


def check_evaluation(evaluation: EvaluationSpec) -> None:
    for source in evaluation.ppl:
        check_source(source, NAMED_SOURCES, "evaluation source")


def check_device(device: str) -> None:
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise SnapPruneError("--device cuda requested but no CUDA device is available; use cpu")


@dataclass
class Evaluated:
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, float]] | None = None


@dataclass
class Outcome:
    """What a job did: the pruning run, the evaluation after it, and data preparation time."""

    run: PruneRun | ShrinkRun
    evaluated: Evaluated
    calibration_data_seconds: float = 0.0


@contextlib.contextmanager
def placed(model: torch.nn.Module, device: str | torch.device) -> Iterator[None]:
    """``model`` on ``device`` inside the block, back where it was after it."""
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if device == home:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to(home)


class Workbench:
    """One loaded model and what jobs on it share. Calibration sets are tokenised (or, for
    ``self``, generated from the model as it is then) on first use and kept; the first block's
    inputs are kept for the last calibration set used."""

    def __init__(self, model, tokenizer, *, device: str = "cpu", progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
        check_device(device)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.progress = progress
        self.log = log or (lambda _message: None)
        self._calibration: dict[tuple, tuple[torch.Tensor, float]] = {}
        self._inputs: tuple[tuple, BlockInputs] | None = None
        self._eval_ids: dict[str, torch.Tensor] = {}

    def _calibration_key(self, spec: CalibrationSpec) -> tuple:
        return (spec.source, spec.nsamples, capped_seqlen(self.model, spec.seqlen), spec.seed)

    def calibration_ids(self, spec: CalibrationSpec) -> tuple[torch.Tensor, float]:
        """Token ids for ``spec`` and the seconds they took to make the first time."""
        from .data import calibration_windows

        key = self._calibration_key(spec)
        if key not in self._calibration:
            t = time.perf_counter()
            with placed(self.model, self.device if spec.source == "self" else "cpu"):
                ids = calibration_windows(spec.source, self.tokenizer, nsamples=spec.nsamples,
                                          seqlen=key[2], seed=spec.seed, model=self.model)
            self._calibration[key] = (ids, time.perf_counter() - t)
        return self._calibration[key]

    def block_inputs(self, spec: CalibrationSpec, batch_size: int) -> BlockInputs:
        key = (*self._calibration_key(spec), batch_size)
        if self._inputs is None or self._inputs[0] != key:
            ids, _ = self.calibration_ids(spec)
            blocks = _blocks(self.model)
            inputs = capture_block_inputs(self.model, blocks, ids, torch.device(self.device),
                                          batch_size)
            self._inputs = (key, inputs)
        return self._inputs[1]

    def eval_ids(self, source: str) -> torch.Tensor:
        from .data import evaluation_ids

        if source not in self._eval_ids:
            self._eval_ids[source] = evaluation_ids(source, self.tokenizer)
        return self._eval_ids[source]

    def evaluate(self, evaluation: EvaluationSpec) -> Evaluated:
        """Perplexity on each source and zero-shot accuracy, with the model on the device."""
        result = Evaluated()
        with placed(self.model, self.device):
            for source in evaluation.ppl:
                res = perplexity(self.model, self.eval_ids(source), seqlen=evaluation.seqlen,
                                 max_windows=evaluation.max_windows, device=self.device,
                                 source=Path(source).name, progress=self.progress)
                result.perplexity[source] = res
                self.log(f"perplexity {source}: {res.perplexity:.3f} "
                         f"({res.windows} windows of {res.seqlen})")
            if evaluation.zeroshot:
                from .eval.zeroshot import evaluate_zeroshot

                result.zeroshot = evaluate_zeroshot(
                    self.model, self.tokenizer, list(evaluation.zeroshot),
                    limit=evaluation.limit, device=self.device, progress=self.progress)
        return result

    @torch.no_grad()
    def announce_cost(self, job: Job) -> None:
        """One line before the calibration passes: how many tokens, and about how long on this
        device, timed on one window (each block runs every window twice: statistics, then
        propagation). ``self`` calibration also says what generating its text costs."""
        if not job.settings.needs_calibration:
            return
        spec = job.calibration
        if spec.source != "self":  # text that cannot serve is refused before any estimate
            self.calibration_ids(spec)
        seqlen = capped_seqlen(self.model, spec.seqlen)
        vocab = self.model.config.vocab_size
        window = torch.randint(0, vocab, (1, seqlen), generator=torch.Generator().manual_seed(0))
        with placed(self.model, self.device):
            window = window.to(self.device)
            seconds = []
            for _ in range(2):  # the first call pays one-off costs
                t = time.perf_counter()
                self.model(window, use_cache=False)
                seconds.append(time.perf_counter() - t)
            estimate = 2 * spec.nsamples * seconds[-1]
            tokens = spec.nsamples * seqlen
            self.log(f"calibration: {spec.nsamples} windows × {seqlen} tokens = {tokens:,} "
                     f"tokens; the calibration passes take about {_duration(estimate)} on "
                     f"{self.device} (timed on one window); --nsamples and --seqlen scale it")
            if spec.source == "self" and self._calibration_key(spec) not in self._calibration:
                prompt = window[:, :1].expand(spec.nsamples, 1)
                t = time.perf_counter()
                self.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                    do_sample=False, max_new_tokens=4, min_new_tokens=4,
                                    pad_token_id=0)
                step = (time.perf_counter() - t) / 4
                self.log(f"calibration source 'self': generating {tokens:,} tokens with the "
                         f"model takes at least {_duration(step * seqlen)}; a local text file "
                         "(--calib FILE) avoids it")

    def check(self, job: Job) -> None:
        """Refusals that need the model (layer widths, finite weights, width plans); block
        parameters that no adapter rule covers are named (they are left as they are)."""
        adapter = adapter_for(self.model)
        _, uncovered = adapter.coverage(adapter.decoder_blocks(self.model)[0])
        if uncovered:
            self.log(f"note: {len(uncovered)} parameter(s) of each block match no rule of the "
                     f"{adapter.family} adapter and stay as they are: "
                     f"{', '.join(uncovered[:4])}{', …' if len(uncovered) > 4 else ''}")
        if isinstance(job.settings, WidthSettings):
            plan_width(self.model, job.settings)
        else:
            check_model_for_pruning(target_layers(self.model, job.settings), job.settings)

    def prune(self, job: Job, *, verbose: bool = False) -> tuple[PruneRun | ShrinkRun, float]:
        """Prune the model in place as ``job`` says; return the run and the seconds its
        calibration set took to make (once per workbench; 0 when none is needed)."""
        inputs, data_seconds, capture_seconds = None, 0.0, 0.0
        if job.settings.needs_calibration:
            _, data_seconds = self.calibration_ids(job.calibration)
            t = time.perf_counter()
            inputs = self.block_inputs(job.calibration, job.batch_size)
            capture_seconds = time.perf_counter() - t
        log = self.log if verbose else None
        if isinstance(job.settings, WidthSettings):
            # The smaller model replaces the loaded one; cached first-block inputs (embeddings
            # and block arguments) stay valid, since shrinking never touches them.
            self.model, run = shrink_model(
                self.model, None, job.settings, device=self.device, batch_size=job.batch_size,
                progress=self.progress, log=log, block_inputs=inputs,
                activations=job.activations)
        else:
            run = prune_model(self.model, None, job.settings, device=self.device,
                              batch_size=job.batch_size, progress=self.progress, log=log,
                              block_inputs=inputs, activations=job.activations,
                              layer_errors=job.layer_errors)
        # The first block's inputs are part of the calibration passes when this job made them.
        run.calibration_seconds += capture_seconds
        run.total_seconds += capture_seconds
        return run, data_seconds

    def run(self, job: Job, *, verbose: bool = False) -> Outcome:
        """The run path: prune, then evaluate."""
        run, data_seconds = self.prune(job, verbose=verbose)
        if isinstance(run, ShrinkRun):
            plan = run.plan
            self.log(f"shrank MLP {plan.mlp_old} -> {plan.mlp_new} neurons, heads "
                     f"{plan.heads_old} -> {plan.heads_new}: {run.parameters_before:,} -> "
                     f"{run.parameters_after:,} parameters in {run.total_seconds:.1f}s "
                     f"(solver {run.solver_seconds:.1f}s)")
        else:
            self.log(f"pruned {len(run.layers)} layers to sparsity {run.achieved_sparsity:.4f} "
                     f"in {run.total_seconds:.1f}s (solver {run.solver_seconds:.1f}s)")
        return Outcome(run, self.evaluate(job.evaluation), data_seconds)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _blocks(model):
    return adapter_for(model).decoder_blocks(model)
