"""The ``shrink`` step: whole MLP neurons and attention heads removed from every block and cut
out (``models.shrink``): a smaller standard config, faster in every runtime; joint with
quantisation on the cut-out shapes when a ``quantize`` step follows."""

from __future__ import annotations

import time

from ..engine import METRICS, method_names, prune_weight
from ..flags import Command, Flag, default_text, fraction, number, positive_int
from ..models import decilm
from ..models.adapters import adapter_for
from ..models.layout import linear_weight
from ..models.settings import WIDTH_ALLOCATIONS, ShrinkSettings
from ..models.shrink import plan_width, shrink_model, width_report
from ..models.width_plot import plot_widths
from .base import EstimatePart, Probe, Step, StepContext
from .prune import fused_quantization, joint_pass, weight_step_report

EPILOG = """\
shrink removes whole MLP neurons (--mlp) and attention heads (--heads) from every decoder block
and cuts them out: the saved model has a smaller standard config (intermediate_size,
num_attention_heads) that plain transformers loads, and runs faster everywhere. The method
picks the units (summed saliency of their columns in down_proj / o_proj) and, for thanos and
sparsegpt, updates the remaining columns to compensate. Every block loses the same count; the
MLP width is rounded to --multiple-of; with grouped-query attention every key/value group loses
the same number of query heads. Heads need a config with its own head_dim (LLaMA family);
OPT, GPT-2 and GPT-NeoX shrink their MLP only.

--allocation sensitivity removes the same total, but each block its own share: one pass of the
dense model measures, at a few counts per block, the output error the method's cut leaves as a
share of the stream leaving the block, and the counts with the least summed error are chosen
(each block keeps at least 10 % of its neurons and one head per group). Blocks of different
widths have no standard transformers config: write --format gguf (llama.cpp's deci
architecture, LLaMA family), or --format hf with --multiple-of 256 and no --heads (the
Nemotron-NAS layout vLLM reads). The report lists every block's widths and a plot shows them
(widths.png).

example:
  snapprune shrink --model smollm2-135m --method thanos --mlp 0.3 --out runs/smollm2-mlp30
  snapprune shrink --model smollm2-135m --mlp 0.3 --allocation sensitivity --format gguf \
      --out runs/smollm2-mlp30s
"""


class ShrinkStep(Step):
    name = "shrink"
    settings_type = ShrinkSettings
    order = 10
    label = "shrunk"
    verb = "shrink"
    removes_weights = True
    changes = frozenset({"shapes"})
    fuses = ("quantize",)
    suggest_rank = 3
    command = Command(
        "shrink", help="remove whole MLP neurons / heads: a smaller, faster model",
        description="Cut whole MLP neurons and attention heads out of every decoder block.",
        epilog=EPILOG, what="shrinking", first_group="what to remove",
        groups=("fused", "calibration", "evaluation", "output"))
    flags = (
        Flag("method", ("--method",), lambda: "how units are chosen and the rest updated: "
             + ", ".join(method_names()) + " (thanos: one exact shared solve)"
             + default_text(ShrinkSettings, "method"), metavar="NAME", show_default=False),
        Flag("mlp", ("--mlp",), "fraction of MLP neurons removed per block, in [0, 1)",
             type=fraction, metavar="F"),
        Flag("heads", ("--heads",), "fraction of query heads removed per block, in [0, 1)",
             type=fraction, metavar="F"),
        Flag("multiple_of", ("--multiple-of",), "round the new MLP width to a multiple of K",
             type=positive_int, metavar="K"),
        Flag("metric", ("--metric",), f"unit saliency: {', '.join(METRICS)} (default: the "
             "method's own)", metavar="NAME", show_default=False),
        Flag("percdamp", ("--percdamp",), "Hessian damping, fraction of its mean diagonal",
             type=number, metavar="F"),
        Flag("allocation", ("--allocation",), "uniform: every block loses the same share; "
             "sensitivity: each block its own, from measured errors (see below)",
             choices=WIDTH_ALLOCATIONS),
        Flag("alpha", ("--alpha",), "must be 0: outlier rows cannot be cut out (see prune "
             "--alpha)", type=number, metavar="A", show_default=False),
    )

    def check(self, settings: ShrinkSettings, job) -> None:
        settings.check()
        fmt = job.output.format if job.output is not None else None
        if settings.allocation == "sensitivity":  # deci GGUF or Nemotron-NAS
            decilm.check_requested(fmt, heads_vary=bool(settings.heads),
                                   multiple_of=settings.multiple_of if settings.mlp else None)

    def check_model(self, settings: ShrinkSettings, job, model) -> None:
        plan_width(model, settings)
        if (settings.allocation == "sensitivity" and job.output is not None
                and job.output.format == "hf"):
            decilm.check_model(model, multiple_of=settings.multiple_of)

    def estimate_layers(self, settings: ShrinkSettings, model) -> dict[str, float | None]:
        adapter = adapter_for(model)
        layers: dict[str, float | None] = {}
        if settings.mlp:
            first = adapter.decoder_blocks(model)[0]
            layers[adapter.mlp_groups(first)[0][1]] = settings.mlp
        if settings.heads:
            layers[adapter.attention.o] = settings.heads
        return layers

    def estimate(self, settings: ShrinkSettings, probe: Probe) -> EstimatePart:
        solve = 0.0
        for name, share in self.estimate_layers(settings, probe.model).items():
            t = time.perf_counter()
            prune_weight(linear_weight(probe.layers[name]).clone(),
                         probe.stats and probe.stats[name], method=settings.method,
                         pattern="structured", sparsity=share, metric=settings.metric,
                         percdamp=settings.percdamp)
            solve += time.perf_counter() - t
        return EstimatePart(solver_seconds=solve)

    def apply(self, settings: ShrinkSettings, context: StepContext, fused=None):
        bench = context.bench
        block_pass = joint_pass(settings, context, fused)
        # The smaller model replaces the loaded one; cached first-block inputs (embeddings and
        # block arguments) stay valid, since shrinking never touches them.
        bench.model, run = shrink_model(bench.model, None, settings, quantize=fused,
                                        **block_pass.options)
        return block_pass.account(run)

    def fused_runs(self, run) -> list[tuple[str, object]]:
        return fused_quantization(run)

    def log_line(self, run, *, fused: bool = False) -> str:
        return (f"shrank {', '.join(_widths(run.plan))}: {run.parameters_before:,} -> "
                f"{run.parameters_after:,} parameters in {run.total_seconds:.1f}s (solver "
                f"{run.solver_seconds:.1f}s)")

    def summary(self, run) -> str:
        parts = _widths(run.plan)
        return (f"{run.settings.method} shrink: {', '.join(parts)}; parameters "
                f"{run.parameters_before:,} → {run.parameters_after:,} "
                f"(-{1 - run.parameters_after / max(1, run.parameters_before):.1%})")

    def report(self, run) -> dict:
        return {**weight_step_report(run, None), "width": width_report(run)}

    def files(self, run, directory) -> list[str]:
        if run.sensitivity is None:
            return []
        return ["widths.png"] if plot_widths(run, directory / "widths.png") else []

    def next_step(self, job, where) -> str | None:
        if set(job.kinds) <= {"prune"}:
            return (f"  snapprune shrink --model {job.model} --method thanos --mlp 0.3 --out "
                    f"{where}-mlp30      # smaller and faster in every runtime")
        return None


def _widths(plan) -> list[str]:
    """What changed, per block where the blocks differ (``MLP 1536 → 928–1408 neurons``)."""
    def span(values: list[int]) -> str:
        low, high = min(values), max(values)
        return f"{low}" if low == high else f"{low}–{high} (per block)"

    blocks = range(max(len(plan.mlp_blocks), len(plan.heads_blocks), 1))
    parts = []
    mlp = [plan.mlp_at(i) for i in blocks]
    heads = [plan.heads_at(i) for i in blocks]
    if mlp != [plan.mlp_old] * len(mlp):
        parts.append(f"MLP {plan.mlp_old} → {span(mlp)} neurons")
    if heads != [plan.heads_old] * len(heads):
        parts.append(f"heads {plan.heads_old} → {span(heads)}")
    return parts
