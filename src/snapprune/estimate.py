"""How long a job will take, said before it starts.

Measured, not modelled: a copy of the first decoder block runs on the device with one
calibration window (statistics pass, then propagation), its layers are pruned once with those
statistics, and the output head scores one evaluation window. Every block costs about the
same, so the calibration passes are ``blocks × windows × (statistics + propagation)``, the
solver ``blocks × one block's solve``, and each evaluation ``windows × (blocks × one block's
forward + head)``. Only one block (and the output head) is ever on the device for it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch

from .eval.perplexity import capped_seqlen
from .jobs import Job
from .models.adapters import adapter_for
from .models.blockloop import gather_layer_stats, propagate
from .models.capture import capture_block_inputs
from .progress import duration
from .steps import Probe, needs_calibration, step_for


@dataclass
class Estimate:
    calibration_seconds: float = 0.0
    solver_seconds: float = 0.0
    evaluation_seconds: float = 0.0
    training_seconds: float = 0.0
    tokens: int = 0
    windows: int = 0
    device: str = "cpu"

    @property
    def total_seconds(self) -> float:
        return (self.calibration_seconds + self.solver_seconds + self.evaluation_seconds
                + self.training_seconds)

    def describe(self) -> str:
        parts = []
        if self.tokens:
            parts.append(f"calibration passes over {self.windows} windows = {self.tokens:,} "
                         f"tokens ~{duration(self.calibration_seconds)}")
        if self.solver_seconds or not self.training_seconds:
            parts.append(f"solver ~{duration(self.solver_seconds)}")
        if self.training_seconds:
            parts.append(f"recovery training ~{duration(self.training_seconds)}")
        if self.evaluation_seconds:
            parts.append(f"evaluation ~{duration(self.evaluation_seconds)}")
        return (f"estimate on {self.device}: " + ", ".join(parts)
                + f"; about {duration(self.total_seconds)} in all (timed on the first block)")


def _timed(fn) -> float:
    fn()  # the first call pays one-off costs (allocation, kernel selection)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@torch.no_grad()
def estimate_job(bench, job: Job) -> Estimate:
    """Time the first block on one window and scale (see the module docstring); each step
    times its own work on the probe (``Step.estimate``)."""
    model = bench.model
    device = torch.device(bench.device)
    blocks = adapter_for(model).decoder_blocks(model)
    count = len(blocks)
    out = Estimate(device=str(device))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    block = copy.deepcopy(blocks[0]).to(device)
    names: set[str] = set()
    for settings in job.steps:
        names |= set(step_for(settings).estimate_layers(settings, model))
    modules = dict(block.named_modules())
    named = {n: modules[n] for n in sorted(names)}

    def forward_seconds(seqlen: int, with_stats: bool = True):
        window = torch.randint(0, vocab, (1, seqlen), generator=gen)
        inputs = capture_block_inputs(model, blocks, window, device, 1, share=False)
        stats = None
        stats_seconds = 0.0
        if named and with_stats:
            stats_seconds = _timed(lambda: gather_layer_stats(block, named, inputs, device))
            stats = gather_layer_stats(block, named, inputs, device)
        batches = list(inputs.batches)

        def forward():
            inputs.batches[:] = batches
            propagate(block, inputs, device)

        return stats_seconds, _timed(forward), stats

    stats = None
    if named and needs_calibration(job):
        spec = job.calibration
        seqlen = capped_seqlen(model, spec.seqlen)
        stats_seconds, forward, stats = forward_seconds(seqlen)
        out.windows, out.tokens = spec.nsamples, spec.nsamples * seqlen
        out.calibration_seconds = count * spec.nsamples * (stats_seconds + forward)
    probe = Probe(model, device, named, stats, job.execution.layer_errors, job)
    one_pass = out.calibration_seconds
    for settings in job.steps:
        part = step_for(settings).estimate(settings, probe)
        out.solver_seconds += count * part.solver_seconds
        out.training_seconds += part.training_seconds
        out.calibration_seconds += part.passes * one_pass
    evaluation = job.evaluation
    sources = evaluation.sources()
    if sources:
        seqlen = capped_seqlen(model, evaluation.seqlen)
        windows = 0
        for source in sources:
            available = bench.eval_ids(source).numel() // seqlen
            windows += min(available, evaluation.max_windows or available)
        _, forward, _ = forward_seconds(seqlen, with_stats=False)
        head = _head_seconds(model, seqlen, device)
        passes = 2 if (job.steps and evaluation.dense) else 1
        out.evaluation_seconds = passes * windows * (count * forward + head)
    return out


def _head_seconds(model, seqlen: int, device: torch.device) -> float:
    """The output head (final norm, output matrix, log-softmax) on one window."""
    head = copy.deepcopy(model.get_output_embeddings()).to(device)
    hidden = torch.randn(seqlen, head.in_features, device=device, dtype=head.weight.dtype)
    targets = torch.zeros(seqlen, dtype=torch.long, device=device)
    return _timed(lambda: torch.nn.functional.cross_entropy(head(hidden).float(), targets))
