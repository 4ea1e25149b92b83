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

from .engine.quantizers import quantize_weight
from .eval.perplexity import capped_seqlen
from .jobs import Job
from .models.adapters import adapter_for
from .models.blockloop import gather_layer_stats, propagate
from .models.capture import capture_block_inputs
from .models.layout import linear_weight
from .models.settings import PruneSettings, QuantizeSettings, RecoverSettings, ShrinkSettings
from .models.targets import target_layers
from .placement import placed


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


def duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _timed(fn) -> float:
    fn()  # the first call pays one-off costs (allocation, kernel selection)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _weight_step(job: Job):
    return next((s for s in job.steps if isinstance(s, (PruneSettings, ShrinkSettings))), None)


def _quantize_step(job: Job):
    return next((s for s in job.steps if isinstance(s, QuantizeSettings)), None)


def training_seconds(model, settings: RecoverSettings, device: torch.device) -> float:
    """Recovery: one window's training loss (the model standing in for its teacher, whose
    forward pass costs about the same), forward and backward, times every window of the run."""
    from .recovery import loss_of

    window = torch.randint(0, model.config.vocab_size, (1, settings.seqlen),
                           generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.train()
    teacher = model if settings.loss == "kd" else None
    with torch.enable_grad():
        t = time.perf_counter()
        loss_of(model, teacher, window, settings).backward()
        seconds = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    windows = settings.steps * settings.accumulate * settings.batch_size
    return seconds * windows


@torch.no_grad()
def estimate_job(bench, job: Job) -> Estimate:
    """Time the first block on one window and scale (see the module docstring)."""
    from .engine import prune_weight

    model = bench.model
    device = torch.device(bench.device)
    blocks = adapter_for(model).decoder_blocks(model)
    count = len(blocks)
    step = _weight_step(job)
    quantize = _quantize_step(job)
    out = Estimate(device=str(device))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    block = copy.deepcopy(blocks[0]).to(device)
    names = set(_step_layers(model, step) if step is not None else [])
    if quantize is not None:
        names |= set(_step_layers(model, quantize))
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

    if step is not None or quantize is not None:
        if job.needs_calibration:
            spec = job.calibration
            seqlen = capped_seqlen(model, spec.seqlen)
            stats_seconds, forward, stats = forward_seconds(seqlen)
            out.windows, out.tokens = spec.nsamples, spec.nsamples * seqlen
            out.calibration_seconds = count * spec.nsamples * (stats_seconds + forward)
        else:
            stats = None
        solve = 0.0
        for name, module in named.items():
            t = time.perf_counter()
            if quantize is not None:
                quantize_weight(linear_weight(module), stats and stats.get(name),
                                quantize.scheme, method=quantize.method,
                                act_order=quantize.act_order, blocksize=quantize.blocksize,
                                percdamp=quantize.percdamp, error=False)
            if step is None or name not in _step_layers(model, step):
                solve += time.perf_counter() - t
                continue
            fraction = _fraction(step, name)
            if isinstance(step, ShrinkSettings):
                prune_weight(linear_weight(module).clone(), stats and stats[name],
                             method=step.method, pattern="structured", sparsity=fraction,
                             metric=step.metric, percdamp=step.percdamp)
            else:
                prune_weight(linear_weight(module).clone(), stats and stats[name],
                             method=step.method, pattern=step.pattern,
                             sparsity=step.resolved_sparsity, alpha=step.alpha,
                             blocksize=step.blocksize, percdamp=step.percdamp,
                             metric=step.metric, error=job.execution.layer_errors)
            solve += time.perf_counter() - t
        out.solver_seconds = count * solve
    recover = next((s for s in job.steps if isinstance(s, RecoverSettings)), None)
    if recover is not None:
        with placed(model, device):
            out.training_seconds = training_seconds(model, recover, device)
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


def _step_layers(model, step) -> list[str]:
    """Block-relative names of the first block's layers the step changes."""
    adapter = adapter_for(model)
    if isinstance(step, QuantizeSettings):
        prefix = f"{adapter.blocks}.0."
        return [n[len(prefix):] for n in target_layers(model, step.include, step.exclude)[0]]
    if isinstance(step, ShrinkSettings):
        names = []
        if step.mlp:
            names.append(adapter.mlp.output)
        if step.heads:
            names.append(adapter.attention.o)
        return names
    prefix = f"{adapter.blocks}.0."
    return [n[len(prefix):] for n in target_layers(model, step.include, step.exclude)[0]]


def _fraction(step, name: str) -> float | None:
    if isinstance(step, ShrinkSettings):
        return step.mlp if "mlp" in name or "fc" in name else step.heads
    return step.resolved_sparsity


def _head_seconds(model, seqlen: int, device: torch.device) -> float:
    """The output head (final norm, output matrix, log-softmax) on one window."""
    head = copy.deepcopy(model.get_output_embeddings()).to(device)
    hidden = torch.randn(seqlen, head.in_features, device=device, dtype=head.weight.dtype)
    targets = torch.zeros(seqlen, dtype=torch.long, device=device)
    return _timed(lambda: torch.nn.functional.cross_entropy(head(hidden).float(), targets))
