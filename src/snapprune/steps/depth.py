"""The ``prune-depth`` step: whole decoder blocks scored on calibration
text, the least useful removed, the stream repaired in closed form (``models.depth``). The
result is the family's standard config with fewer blocks: smaller and faster in every runtime.
It may come before ``shrink`` or ``prune`` in one job (depth first, then width)."""

from __future__ import annotations

from ..flags import Command, Flag, integer, number
from ..models import decilm
from ..models.depth import check_depth, depth_model, depth_report
from ..models.settings import DEPTH_SCORES, DepthSettings
from .base import Step, StepContext, whole_model_pass

EPILOG = """\
prune-depth removes whole decoder blocks: the saved model is the family's standard config with
fewer num_hidden_layers (plain transformers, plain llama in GGUF). Blocks are scored on the
calibration text:
  angular  the angular distance between the residual stream entering and leaving the block
           (how far it turns each token's direction; one pass of the model)
  kl       the measured KL divergence of the next-token distributions with that block alone
           skipped (a pass through the later blocks per candidate, on 8 windows)
The --blocks lowest are removed; --attention K removes the attention sub-layers of the K kept
blocks whose attention changes the stream least (scored the same way; the first kept block
keeps its attention): those blocks become x + MLP(norm(x)), which llama.cpp runs as its deci
architecture (--format gguf) and vLLM as the Nemotron-NAS layout (--format hf, for an MLP
width that is a multiple of 256).
Repair (on unless --no-repair): the MLP output projection of each kept block that lost its
attention or precedes removed blocks is re-fitted by least squares so that the stream it
leaves reproduces the full model's stream there.

example:
  snapprune prune-depth --model smollm2-135m --blocks 4 --score kl --out runs/smollm2-d26
  snapprune prune-depth --model smollm2-135m --attention 8 --format gguf --out runs/a8
"""


class DepthStep(Step):
    name = "prune-depth"
    settings_type = DepthSettings
    order = 5
    label = "shallower"
    verb = "remove blocks"
    removes_weights = True
    changes = frozenset({"blocks"})
    command = Command(
        "prune-depth", help="remove whole decoder blocks (scored, repaired): a shallower model",
        description="Score every decoder block on calibration text, remove the least useful "
                    "ones and repair the stream in closed form.",
        epilog=EPILOG, what="depth pruning", first_group="what to remove",
        groups=("calibration", "evaluation", "output"))
    flags = (
        Flag("blocks", ("--blocks",), "how many whole decoder blocks to remove",
             type=integer, metavar="K"),
        Flag("attention", ("--attention",), "how many attention sub-layers to remove from the "
             "kept blocks (LLaMA family; llama.cpp's deci GGUF, or Nemotron-NAS for --format "
             "hf)", type=integer, metavar="K"),
        Flag("score", ("--score",), "how blocks are ranked: " + ", ".join(DEPTH_SCORES)
             + " (see below)", choices=DEPTH_SCORES),
        Flag("repair", ("--no-repair",), "keep the remaining weights as they are (no "
             "least-squares repair)", action="store_false", show_default=False),
        Flag("percdamp", ("--percdamp",), "the repair's ridge, fraction of its mean diagonal",
             type=number, metavar="F"),
    )

    def check(self, settings: DepthSettings, job) -> None:
        settings.check()
        fmt = job.output.format if job.output is not None else None
        if settings.attention:  # blocks without attention: deci GGUF or Nemotron-NAS
            shrink = job.settings("shrink")  # a width cut in the same job must fit it too
            decilm.check_requested(
                fmt, heads_cut=bool(shrink and shrink.heads),
                multiple_of=shrink.multiple_of if shrink and shrink.mlp else None)

    def check_model(self, settings: DepthSettings, job, model) -> None:
        check_depth(model, settings)
        if settings.attention and job.output is not None and job.output.format == "hf":
            decilm.check_model(model, multiple_of=decilm.WIDTH_MULTIPLE)

    def estimate_layers(self, settings: DepthSettings, model) -> dict[str, float | None]:
        """The MLP's output projection: the estimate then times the calibration pass the
        scores take (the repair takes about two more, the KL score a pass through the later
        blocks per candidate on 8 windows)."""
        from ..models.adapters import adapter_for

        adapter = adapter_for(model)
        return {adapter.mlp_groups(adapter.decoder_blocks(model)[0])[0][1]: None}

    def apply(self, settings: DepthSettings, context: StepContext, fused=None):
        return whole_model_pass(context, depth_model, settings)

    def log_line(self, run, *, fused: bool = False) -> str:
        attention = (f", attention of blocks {run.attention_removed}"
                     if run.attention_removed else "")
        return (f"removed blocks {run.removed}{attention} ({run.blocks_before} -> "
                f"{run.blocks_after} blocks): "
                f"{run.parameters_before:,} -> {run.parameters_after:,} parameters in "
                f"{run.total_seconds:.1f}s")

    def summary(self, run) -> str:
        repaired = sum(1 for r in run.repairs if not r.reason)
        attention = (f", attention removed from blocks "
                     f"{', '.join(map(str, run.attention_removed))}" if run.attention_removed
                     else "")
        return (f"depth ({run.settings.score}): blocks {run.blocks_before} → {run.blocks_after} "
                f"(removed {', '.join(map(str, run.removed)) or 'none'}{attention}; {repaired} "
                f"output projection(s) "
                f"repaired); parameters {run.parameters_before:,} → {run.parameters_after:,} "
                f"(-{1 - run.parameters_after / max(1, run.parameters_before):.1%})")

    def report(self, run) -> dict:
        return {"method": run.settings.method, "pattern": "blocks",
                "settings": {"blocks": run.settings.blocks,
                             "attention": run.settings.attention, "score": run.settings.score,
                             "repair": run.settings.repair,
                             "percdamp": run.settings.percdamp},
                "depth": depth_report(run)}
