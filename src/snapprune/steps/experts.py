"""The ``prune-experts`` step: whole experts of a mixture of experts scored on calibration
text and removed with their router rows (``models.expert_pruning``). With ``uniform``
allocation the result is the family's standard config with fewer experts; ``prune``,
``recover`` and ``quantize`` may follow in the same job."""

from __future__ import annotations

from ..errors import SnapPruneError
from ..flags import Command, Flag, fraction, positive_int
from ..models.expert_pruning import experts_report, plan_counts, prune_experts
from ..models.settings import EXPERT_ALLOCATIONS, EXPERT_SCORES, ExpertSettings
from .base import Step, StepContext, whole_model_pass

EPILOG = """\
prune-experts removes whole experts from a mixture-of-experts model (Qwen3-MoE, Qwen2-MoE,
Mixtral, OLMoE), with their router rows: tokens that went to a removed expert go to the next
best. Experts are ranked on the calibration text by
  reap       REAP's saliency: router weight x output norm, averaged over the expert's tokens
  frequency  the share of tokens routed to it
  error      the measured change of the block's output with that expert alone removed
Budget: --keep F (fraction of each block's experts kept, on average) or --remove K (experts
removed per block, on average). --allocation uniform removes the same count from every block
(a standard config: plain transformers); sensitivity gives each block its own count from the
measured cost of removing its lowest-ranked experts (the least summed cost for the same total;
no standard config holds per-block expert counts, so it is measured with --no-save only).
A block never keeps fewer experts than the router picks per token (its top-k).

example:
  snapprune prune-experts --model Qwen/Qwen3-30B-A3B --keep 0.75 --out runs/qwen3-e96
  snapprune prune-experts --model M --remove 2 --score error --allocation sensitivity --no-save
"""


class ExpertStep(Step):
    name = "prune-experts"
    settings_type = ExpertSettings
    order = 6
    label = "expert-pruned"
    verb = "remove experts"
    removes_weights = True
    changes = frozenset({"experts"})
    records_layers = False
    single_process = ("prune-experts scores the experts in one process; run it without "
                      "torchrun")
    command = Command(
        "prune-experts", help="remove whole experts of a mixture of experts (scored, counted "
                              "per block to a budget)",
        description="Score every expert of a mixture-of-experts model on calibration text and "
                    "remove the least useful ones with their router rows.",
        epilog=EPILOG, what="expert pruning", first_group="what to remove",
        groups=("calibration", "evaluation", "output"))
    flags = (
        Flag("keep", ("--keep",), "fraction of each block's experts kept, on average",
             type=fraction, metavar="F", show_default=False),
        Flag("remove", ("--remove",), "experts removed per block, on average",
             type=positive_int, metavar="K", show_default=False),
        Flag("score", ("--score",), "how experts are ranked: " + ", ".join(EXPERT_SCORES)
             + " (see below)", choices=EXPERT_SCORES),
        Flag("allocation", ("--allocation",), "uniform: the same count from every block; "
             "sensitivity: each block its own, from measured costs (see below)",
             choices=EXPERT_ALLOCATIONS),
        Flag("merge", ("--merge",), "average each removed expert into its most similar kept "
             "one, weighted by routed tokens (an ablation)", action="store_true",
             show_default=False),
    )

    def check(self, settings: ExpertSettings, job) -> None:
        settings.check()
        if settings.allocation == "sensitivity" and job.output is not None:
            raise SnapPruneError(
                "blocks with different expert counts have no standard config (transformers "
                "and llama.cpp hold one count per model): use --allocation uniform, or "
                "--no-save to measure it")

    def check_model(self, settings: ExpertSettings, job, model) -> None:
        plan_counts(model, settings)

    def apply(self, settings: ExpertSettings, context: StepContext, fused=None):
        return whole_model_pass(context, prune_experts, settings)

    def log_line(self, run, *, fused: bool = False) -> str:
        return (f"removed experts ({run.settings.score}, {run.settings.allocation}): "
                f"{run.experts_before} -> {run.experts_after} experts, "
                f"{run.parameters_before:,} -> {run.parameters_after:,} parameters in "
                f"{run.total_seconds:.1f}s")

    def summary(self, run) -> str:
        low, high = min(run.counts), max(run.counts)
        kept = f"{low}" if low == high else f"{low}–{high} (per block)"
        return (f"experts ({run.settings.score}, {run.settings.allocation}): "
                f"{run.experts_before // max(1, len(run.counts))} → {kept} per block"
                f"{', merged' if run.settings.merge else ''}; parameters "
                f"{run.parameters_before:,} → {run.parameters_after:,} "
                f"(-{1 - run.parameters_after / max(1, run.parameters_before):.1%})")

    def report(self, run) -> dict:
        return {"method": run.settings.method, "pattern": "experts",
                "settings": {"keep": run.settings.keep, "remove": run.settings.remove,
                             "score": run.settings.score,
                             "allocation": run.settings.allocation,
                             "merge": run.settings.merge},
                "experts_removed": experts_report(run)}

    def next_step(self, job, where) -> str | None:
        if job.kinds == ("prune-experts",):
            return (f"  snapprune prune --model {where} --method thanos --sparsity 0.5 --out "
                    f"{where}-50      # prune the kept experts' weights too")
        return None
