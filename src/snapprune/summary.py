"""What a finished run prints: what happened, in a few labelled lines, and what to do next."""

from __future__ import annotations

from pathlib import Path

from .progress import duration
from .steps import REGISTRY, after_label, before_label, step_for


def verdict(ratio: float) -> str:
    """A plain-words reading of a perplexity ratio (after / before)."""
    if ratio < 0.95:  # recovery (or a quantisation that denoises) can improve on its input
        return "better than before"
    if ratio < 1.05:
        return "about as good as before"
    if ratio < 1.5:
        return "a moderate loss"
    if ratio < 3:
        return "a large loss; recovery (snapprune recover) wins much of it back"
    return ("a severe loss: recover it (snapprune recover), or try a lower sparsity or "
            "shrink instead")


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
    for result in outcome.results:
        what = result.step.summary(result.run)
        lines.append(f"  + {result.step.verb:10s}{what} (same pass)" if result.fused
                     else f"  step        {what}")
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
        if outcome.save_dtype is not None and job.output.format == "hf":
            given = job.dtype != "auto"
            lines.append(f"              weights in {str(outcome.save_dtype).split('.')[-1]} ("
                         + ("--dtype" if given else "the source's; --dtype float32 to keep "
                            "full precision") + ")")
    elif job.steps:
        lines.append("  saved       nothing (--no-save)")
    if job.steps and saved is not None:
        lines += _next_steps(job, saved, outcome.model)
    return lines


def _estimated_parts(outcome) -> float:
    """The measured time of what the estimate covers: the steps and the evaluations."""
    steps = sum(run.total_seconds for run in outcome.runs)
    evaluations = sum(outcome.seconds.get(k, 0.0) for k in ("dense_evaluation_seconds",
                                                              "evaluation_seconds"))
    return steps + evaluations


def _next_steps(job, saved: Path, model=None) -> list[str]:
    try:
        where = saved.relative_to(Path.cwd())
    except ValueError:
        where = saved
    from .export.hf import differing_blocks

    shapes = (differing_blocks(model) if job.output.format == "gguf" and model is not None
              else None)
    if shapes is not None:
        # llama.cpp's deci file: transformers (and so snapprune) cannot load it back
        return ["next:",
                f"  llama-cli -m {where}/model.gguf -p 'The capital of France is' -n 32"
                "      # run it where it runs: llama.cpp",
                f"  llama-perplexity -m {where}/model.gguf -f wiki.test.raw"
                "      # its perplexity there",
                *(["  # to recover or quantise it further, cut it again with --format hf "
                   "(the Nemotron-NAS layout, MLP widths in steps of 256), which snapprune "
                   "loads"] if len({w.heads for w in shapes if w.heads}) <= 1 else
                  ["  # its blocks' query heads differ, which only GGUF holds: recover or "
                   "quantise in the same job (a recipe) to change it further"]),
                f"  snapprune run {where}/snapprune_recipe.yaml --out {where}-again"
                "      # replay this run"]
    compare = next((c for c in (step_for(s).compare_with(s, job) for s in job.steps) if c),
                   job.model)
    lines = ["next:",
             f"  snapprune generate --model {where} --compare {compare}"
             "      # does it still talk?",
             f"  snapprune eval --model {where} --max-windows all"
             "      # the whole WikiText-2 test split"]
    for step in sorted(REGISTRY.values(), key=lambda s: s.suggest_rank):
        line = step.next_step(job, where)
        if line:
            lines.append(line)
    lines.append(f"  snapprune run {where}/snapprune_recipe.yaml --out {where}-again"
                 "      # replay this run")
    return lines

