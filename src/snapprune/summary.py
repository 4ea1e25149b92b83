"""What a finished run prints: what happened, in a few labelled lines, and what to do next."""

from __future__ import annotations

import math
from pathlib import Path

from .estimate import duration
from .models.prune import PruneRun
from .models.quantize import QuantizeRun
from .models.settings import PruneSettings, QuantizeSettings, RecoverSettings, ShrinkSettings
from .models.shrink import ShrinkRun
from .recovery import RecoverRun
from .run import after_label, before_label


def verdict(ratio: float) -> str:
    """A plain-words reading of a perplexity ratio (after / before)."""
    if ratio < 1.05:
        return "about as good as before"
    if ratio < 1.5:
        return "a moderate loss"
    if ratio < 3:
        return "a large loss; recovery (snapprune recover) wins much of it back"
    return ("a severe loss: recover it (snapprune recover), or try a lower sparsity or "
            "shrink instead")


def _what(run) -> str:
    settings = run.settings
    if isinstance(run, ShrinkRun):
        plan = run.plan
        parts = []
        if plan.mlp_new != plan.mlp_old:
            parts.append(f"MLP {plan.mlp_old} → {plan.mlp_new} neurons")
        if plan.heads_new != plan.heads_old:
            parts.append(f"heads {plan.heads_old} → {plan.heads_new}")
        return (f"{settings.method} shrink: {', '.join(parts)}; parameters "
                f"{run.parameters_before:,} → {run.parameters_after:,} "
                f"(-{1 - run.parameters_after / max(1, run.parameters_before):.1%})")
    if isinstance(run, PruneRun):
        pattern = settings.pattern
        return (f"{settings.method} {pattern}: sparsity {run.achieved_sparsity:.1%} of the "
                f"{len(run.layers)} pruned layers' weights")
    if isinstance(run, QuantizeRun):
        return _quantized(run)
    if isinstance(run, RecoverRun):
        kept = "structure kept exactly" if run.structure_kept else "STRUCTURE CHANGED"
        first, last = run.curve[0]["loss"], run.curve[-1]["loss"]
        return (f"recover {run.settings.loss}: {run.tokens_seen:,} tokens in "
                f"{duration(run.total_seconds)} ({run.tokens_per_second:.0f} tokens/s), loss "
                f"{first:.3f} → {last:.3f}, {run.frozen_zeros:,} zeros held, {kept}")
    return type(run).__name__


def _quantized(run: QuantizeRun) -> str:
    scheme = run.scheme
    errors = [r.error for r in run.layers if math.isfinite(r.error)]
    mean = f"; mean layer error {sum(errors) / len(errors):.4f}" if errors else ""
    return (f"{run.settings.method} {scheme.name} ({scheme.bits_per_weight:g} bits per weight) "
            f"on {len(run.layers)} layers{mean}")


def summary_lines(outcome) -> list[str]:
    """The closing summary of ``outcome`` (a ``run.Outcome``)."""
    job, report = outcome.job, outcome.report
    lines = []
    total = outcome.seconds.get("total_seconds")
    head = "snapprune: done"
    if total is not None:
        head += f" in {duration(total)}"
        measured = _estimated_parts(outcome)
        if outcome.estimate is not None and measured:
            head += (f"; calibration, solver and evaluation took {duration(measured)} "
                     f"(estimated {duration(outcome.estimate.total_seconds)})")
    lines.append(head)
    for run in outcome.runs:
        lines.append(f"  step        {_what(run)}")
        if getattr(run, "quantization", None) is not None:
            lines.append(f"  + quantise  {_quantized(run.quantization)} (same pass)")
    after = report.get("perplexity", {})
    before = report.get("dense_perplexity", {})
    label = after_label(job) or "model"
    for source, result in after.items():
        name = Path(source).name
        windows = f"{result['windows']} × {result['seqlen']} tokens"
        if source in before:
            dense = before[source]["perplexity"]
            ratio = result["perplexity"] / dense
            lines.append(f"  perplexity  {name} ({windows}): {before_label(job)} {dense:.2f} → "
                         f"{label} "
                         f"{result['perplexity']:.2f} ({ratio:.2f}×: {verdict(ratio)})")
        else:
            lines.append(f"  perplexity  {name} ({windows}): {label} "
                         f"{result['perplexity']:.2f}")
    zeroshot = report.get("zeroshot", {})
    if zeroshot:
        mean = {k: v.get("mean", {}).get("acc_norm") for k, v in zeroshot.items()}
        lines.append("  zero-shot   mean acc_norm " + ", ".join(
            f"{k} {v:.3f}" for k, v in mean.items() if v is not None))
    saved = outcome.saved
    if saved is not None:
        files = report.get("files", {})
        model_files = ", ".join(f"{name} {size / 1e6:.1f} MB" for name, size in files.items()
                                if name.endswith((".gguf", ".safetensors")))
        lines.append(f"  saved       {saved}/ ({model_files or 'model'}, "
                     "snapprune_report.json, snapprune_recipe.yaml)")
    elif job.steps:
        lines.append("  saved       nothing (--no-save)")
    if job.steps and saved is not None:
        lines += _next_steps(job, saved)
    return lines


def _estimated_parts(outcome) -> float:
    """The measured time of what the estimate covers: the steps and the evaluations."""
    steps = sum(run.total_seconds for run in outcome.runs)
    evaluations = sum(outcome.seconds.get(k, 0.0) for k in ("dense_evaluation_seconds",
                                                              "evaluation_seconds"))
    return steps + evaluations


def _next_steps(job, saved: Path) -> list[str]:
    try:
        where = saved.relative_to(Path.cwd())
    except ValueError:
        where = saved
    compare = job.model
    recovery = next((s for s in job.steps if isinstance(s, RecoverSettings)), None)
    if recovery is not None and not any(isinstance(s, (PruneSettings, ShrinkSettings))
                                        for s in job.steps):
        compare = recovery.teacher or compare
    lines = ["next:",
             f"  snapprune generate --model {where} --compare {compare}"
             "      # does it still talk?",
             f"  snapprune eval --model {where} --max-windows all"
             "      # the whole WikiText-2 test split"]
    kinds = {type(s) for s in job.steps}
    if kinds & {PruneSettings, ShrinkSettings} and RecoverSettings not in kinds:
        lines.append(f"  snapprune recover --model {where} --out {where}-recovered"
                     "      # win back quality, structure kept")
    if QuantizeSettings not in kinds:
        lines.append(f"  snapprune quantize --model {where} --scheme q4_0 --format gguf --out "
                     f"{where}-q4_0      # 4-bit, for llama.cpp")
    if not kinds & {ShrinkSettings, RecoverSettings, QuantizeSettings}:
        lines.append(f"  snapprune shrink --model {job.model} --method thanos --mlp 0.3 --out "
                     f"{where}-mlp30      # smaller and faster in every runtime")
    lines.append(f"  snapprune run {where}/snapprune_recipe.yaml --out {where}-again"
                 "      # replay this run")
    return lines

