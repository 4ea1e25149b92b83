"""A ``Workbench``: one loaded model and what several jobs on it can share (tokenised
calibration sets, the first block's inputs, tokenised evaluation text), with the operations
the run path applies to it: check, evaluate, sample, apply a step."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .eval.perplexity import PerplexityResult, capped_seqlen, perplexity
from .generate import DEFAULT_PROMPTS, greedy_completions
from .jobs import CalibrationSpec, EvaluationSpec, Job
from .models.adapters import adapter_for
from .models.capture import BlockInputs, capture_block_inputs
from .models.prune import PruneRun, check_model_for_pruning, prune_model
from .models.quantize import QuantizeRun, check_quantizable, quantize_model
from .models.settings import PruneSettings, QuantizeSettings, ShrinkSettings
from .models.shrink import ShrinkRun, plan_width, shrink_model
from .models.targets import target_layers
from .placement import placed


@dataclass
class Evaluated:
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    zeroshot: dict[str, dict[str, float]] | None = None


class Workbench:
    """One loaded model and what jobs on it share. Calibration sets are tokenised (or, for
    ``self``, generated from the model as it is then) on first use and kept; the first block's
    inputs are kept for the last calibration set used."""

    def __init__(self, model, tokenizer, *, device: str = "cpu", progress: bool = True,
                 log: Callable[[str], None] | None = None) -> None:
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
        """Token ids for a resolved ``spec`` and the seconds they took to make the first
        time."""
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
            blocks = adapter_for(self.model).decoder_blocks(self.model)
            inputs = capture_block_inputs(self.model, blocks, ids, torch.device(self.device),
                                          batch_size)
            self._inputs = (key, inputs)
        return self._inputs[1]

    def eval_ids(self, source: str) -> torch.Tensor:
        from .data import evaluation_ids

        if source not in self._eval_ids:
            self._eval_ids[source] = evaluation_ids(source, self.tokenizer)
        return self._eval_ids[source]

    def evaluate(self, evaluation: EvaluationSpec, *, label: str = "",
                 streamed: bool = False) -> Evaluated:
        """Perplexity on each source and zero-shot accuracy, with the model on the device."""
        result = Evaluated()
        if evaluation.empty(streamed):
            return result
        with placed(self.model, self.device):
            for source in evaluation.sources(streamed):
                res = perplexity(self.model, self.eval_ids(source), seqlen=evaluation.seqlen,
                                 max_windows=evaluation.max_windows, device=self.device,
                                 source=Path(source).name, label=label,
                                 progress=self.progress)
                result.perplexity[source] = res
            if evaluation.zeroshot:
                from .eval.zeroshot import evaluate_zeroshot

                result.zeroshot = evaluate_zeroshot(
                    self.model, self.tokenizer, list(evaluation.zeroshot),
                    limit=evaluation.limit, device=self.device, progress=self.progress)
        return result

    def samples(self, max_new_tokens: int = 24) -> list[str]:
        """Greedy completions of the default prompts (the model on the device meanwhile)."""
        with placed(self.model, self.device):
            return greedy_completions(self.model, self.tokenizer, DEFAULT_PROMPTS,
                                      max_new_tokens=max_new_tokens, device=self.device)

    def check(self, job: Job) -> None:
        """Refusals that need the model (layer widths, finite weights, width plans); block
        parameters that no adapter rule covers are named (they are left as they are)."""
        adapter = adapter_for(self.model)
        _, uncovered = adapter.coverage(adapter.decoder_blocks(self.model)[0])
        if uncovered:
            self.log(f"note: {len(uncovered)} parameter(s) of each block match no rule of the "
                     f"{adapter.family} adapter and stay as they are: "
                     f"{', '.join(uncovered[:4])}{', …' if len(uncovered) > 4 else ''}")
        for step in job.steps:
            if isinstance(step, ShrinkSettings):
                plan_width(self.model, step)
            elif isinstance(step, PruneSettings):
                check_model_for_pruning(target_layers(self.model, step.include, step.exclude),
                                        step)
            elif isinstance(step, QuantizeSettings) and not any(
                    isinstance(s, ShrinkSettings) for s in job.steps):
                check_quantizable(target_layers(self.model, step.include, step.exclude), step)
        from .export import get_format

        get_format(job.output.format).check_model(self.model, job)

    def apply(self, step, job: Job, *, verbose: bool = False,
              quantize: QuantizeSettings | None = None) -> PruneRun | ShrinkRun | QuantizeRun:
        """Apply one step to the model (in place, or replacing it by a smaller one) and return
        what it did; ``quantize``: quantise in the same pass (joint). Calibration data and the
        first block's inputs come from the workbench's caches."""
        inputs, data_seconds, capture_seconds = None, 0.0, 0.0
        if step.needs_calibration or (quantize is not None and quantize.needs_calibration):
            _, data_seconds = self.calibration_ids(job.calibration)
            t = time.perf_counter()
            inputs = self.block_inputs(job.calibration, job.execution.batch_size)
            capture_seconds = time.perf_counter() - t
        log = self.log if verbose else None
        execution = job.execution
        common = dict(device=self.device, batch_size=execution.batch_size,
                      progress=self.progress, log=log, block_inputs=inputs,
                      activations=execution.activations)
        if isinstance(step, ShrinkSettings):
            # The smaller model replaces the loaded one; cached first-block inputs (embeddings
            # and block arguments) stay valid, since shrinking never touches them.
            self.model, run = shrink_model(self.model, None, step, quantize=quantize, **common)
        elif isinstance(step, QuantizeSettings):
            run = quantize_model(self.model, None, step, layer_errors=execution.layer_errors,
                                 **common)
        else:
            run = prune_model(self.model, None, step, layer_errors=execution.layer_errors,
                              quantize=quantize, **common)
        # The first block's inputs are part of the calibration passes when this job made them.
        run.calibration_seconds += capture_seconds
        run.total_seconds += capture_seconds
        run.data_seconds = data_seconds
        return run
