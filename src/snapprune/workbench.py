"""A ``Workbench``: one loaded model and what several jobs on it can share (tokenised
calibration sets, the first block's inputs, tokenised evaluation text), with the operations
every step uses: calibration data, a block-wise pass's options, evaluation, samples."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .eval.perplexity import PerplexityResult, capped_seqlen, perplexity
from .generate import DEFAULT_PROMPTS, REPORT_TOKENS, greedy_completions
from .jobs import CalibrationSpec, EvaluationSpec, Job
from .models.adapters import adapter_for
from .models.capture import BlockInputs, capture_block_inputs
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

    def sibling(self, model) -> Workbench:
        """A workbench for another model (a candidate cut from this one) sharing the tokenised
        calibration and evaluation text (not the first block's inputs, which are the model's)."""
        other = Workbench(model, self.tokenizer, device=self.device, progress=False)
        other._calibration = self._calibration
        other._eval_ids = self._eval_ids
        return other

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

    def samples(self, max_new_tokens: int = REPORT_TOKENS) -> list[str]:
        """Greedy completions of the default prompts (the model on the device meanwhile)."""
        with placed(self.model, self.device):
            return greedy_completions(self.model, self.tokenizer, DEFAULT_PROMPTS,
                                      max_new_tokens=max_new_tokens, device=self.device)

    def note_uncovered(self) -> None:
        """Block parameters that no adapter rule covers are named (they stay as they are)."""
        adapter = adapter_for(self.model)
        _, uncovered = adapter.coverage(adapter.decoder_blocks(self.model)[0])
        if uncovered:
            self.log(f"note: {len(uncovered)} parameter(s) of each block match no rule of the "
                     f"{adapter.family} adapter and stay as they are: "
                     f"{', '.join(uncovered[:4])}{', …' if len(uncovered) > 4 else ''}")

    def block_pass(self, job: Job, *, calibrated: bool, verbose: bool = False) -> BlockPass:
        """The options of one block-wise pass over the model (device, batching, progress,
        the first block's inputs from the caches when ``calibrated``), and its data timing."""
        inputs, data_seconds, capture_seconds = None, 0.0, 0.0
        if calibrated:
            _, data_seconds = self.calibration_ids(job.calibration)
            t = time.perf_counter()
            inputs = self.block_inputs(job.calibration, job.execution.batch_size)
            capture_seconds = time.perf_counter() - t
        options = dict(device=self.device, batch_size=job.execution.batch_size,
                       progress=self.progress, log=self.log if verbose else None,
                       block_inputs=inputs, activations=job.execution.activations)
        return BlockPass(options, data_seconds, capture_seconds)


@dataclass
class BlockPass:
    """A block-wise pass's options and what making its inputs took."""

    options: dict
    data_seconds: float
    capture_seconds: float

    def account(self, run):
        """Add the first block's capture to the run's calibration time (the pass made it) and
        the text's tokenising time; return the run."""
        run.calibration_seconds += self.capture_seconds
        run.total_seconds += self.capture_seconds
        run.data_seconds = self.data_seconds
        return run
