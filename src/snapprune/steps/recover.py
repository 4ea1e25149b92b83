"""The ``recover`` step: train the pruned or shrunk model back towards the dense one, its
structure kept exactly (``recovery``): the teacher (the model before the job's weight step,
or the dense model the student's report names), training windows checked against the
evaluated text, resumable checkpoints beside the output."""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..data import calibration_windows, resolve_calibration_source
from ..errors import SnapPruneError
from ..eval.perplexity import capped_seqlen
from ..flags import Command, Flag, integer, number, positive_int
from ..models.loading import load_model
from ..models.settings import RECOVER_DTYPES, RECOVER_LOSSES, RecoverSettings
from ..models.streaming import ids_digest
from ..models.teacher import teacher_source
from ..overlap import shared_windows
from ..placement import placed
from ..progress import duration
from ..recovery import (
    checkpoint_dir_for,
    discard_checkpoint,
    loss_of,
    recover,
    resumable,
    run_fingerprint,
    saved_step,
)
from .base import EstimatePart, Probe, Step, StepContext, earlier_changes, removes_weights

EPILOG = """\
recover trains a pruned (zeros in place) or shrunk model to win back what pruning cost,
keeping its structure exactly: every weight that is 0 stays exactly 0 (gradients masked; with
AdamW its moments stay 0), N:M stays N:M, shapes stay. The default loss distils the dense
model's next-token distribution (KL divergence); --hidden-weight adds SquareHead's per-block
normalised MSE; --loss lm is plain language-model fine-tuning, the ablation. The teacher is the
dense model the student's snapprune report names (or --teacher). Training text never overlaps
the evaluation windows (checked). A checkpoint beside --out every --checkpoint-every steps:
after an interruption, the same command with --resume continues it.

examples:
  snapprune prune --model smollm2-135m --method thanos --pattern 2:4 --out runs/p24
  snapprune recover --model runs/p24 --tokens 262144 --out runs/p24-recovered
  snapprune quantize --model runs/p24-recovered --scheme q4_0 --format gguf --out runs/p24-q4
  torchrun --nproc_per_node 2 -m snapprune recover --model runs/p24 --tokens 262144 \\
      --out runs/p24-recovered                          # two processes (DDP, gloo on CPUs)
"""

TRAINING, LONG = "training", "a long run"


def training_seconds(model, settings: RecoverSettings, device: torch.device) -> float:
    """One window's training loss (the model standing in for its teacher, whose forward
    pass costs about the same), forward and backward, times every window of the run."""
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
    return seconds * settings.steps * settings.accumulate * settings.batch_size


def plot_curves(run, path: Path) -> bool:
    """Loss and held-out perplexity against tokens, one PNG; ``False`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, left = plt.subplots(figsize=(7, 4))
    tokens = [p["tokens"] for p in run.curve]
    left.plot(tokens, [p["loss"] for p in run.curve], color="tab:blue", lw=1)
    left.set_xlabel("training tokens")
    left.set_ylabel(f"training loss ({run.settings.loss})", color="tab:blue")
    if run.heldout:
        right = left.twinx()
        right.plot([p["tokens"] for p in run.heldout],
                   [p["perplexity"] for p in run.heldout], "o-", color="tab:red")
        right.set_ylabel("held-out perplexity", color="tab:red")
    left.set_title("recovery")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _flag(field: str, names: tuple[str, ...], text: str, group: str = TRAINING, **options):
    return Flag(field, names, text, group=group, **options)


class RecoverStep(Step):
    name = "recover"
    settings_type = RecoverSettings
    order = 20
    label = "recovered"
    verb = "recover"
    changes = frozenset({"values"})
    records_layers = False
    suggest_rank = 1
    command = Command(
        "recover", help="train a pruned model back towards the dense one, its structure kept",
        description="Recovery by distillation from the dense model (or LM fine-tuning).",
        epilog=EPILOG, what="recovery", first_group=TRAINING,
        groups=("deterministic", "resume", "evaluation", "output"), resume_group=LONG,
        resume_help="continue a recovery that was stopped, from its last checkpoint",
        restart_help="discard a stopped recovery's checkpoint and start over")
    flags = (
        _flag("teacher", ("--teacher",), "the dense model (default: the one the student's "
              "report names)", metavar="DENSE", show_default=False, path=True),
        _flag("tokens", ("--tokens",), "training tokens", type=positive_int, metavar="N"),
        _flag("data", ("--data",), "training text: a calibration source (c4-sample, c4, "
              "wikitext2, self, a local file)", metavar="SRC", path=True),
        _flag("seqlen", ("--seqlen",), "tokens per training window", type=positive_int,
              metavar="L"),
        _flag("batch_size", ("--batch-size",), "windows per micro-batch, over all processes",
              type=positive_int, metavar="N"),
        _flag("accumulate", ("--accumulate",), "micro-batches per optimiser step",
              type=positive_int, metavar="K"),
        _flag("lr", ("--lr",), "AdamW's peak learning rate", type=number, metavar="LR"),
        _flag("warmup", ("--warmup",), "linear warm-up over this fraction of the steps, then "
              "cosine", type=number, metavar="F"),
        _flag("weight_decay", ("--weight-decay",), "AdamW's weight decay", type=number,
              metavar="W"),
        _flag("max_grad_norm", ("--max-grad-norm",), "gradient clipping (0: none)",
              type=number, metavar="G"),
        _flag("loss", ("--loss",), "kd: distillation from the teacher; lm: next-token "
              "cross-entropy", choices=RECOVER_LOSSES),
        _flag("temperature", ("--temperature",), "distillation temperature", type=number,
              metavar="T"),
        _flag("hidden_weight", ("--hidden-weight",), "weight of the per-block normalised MSE "
              "to the teacher's hidden states (SquareHead)", type=number, metavar="W"),
        _flag("dtype", ("--train-dtype",), "compute precision (bfloat16: autocast, float32 "
              "master weights)", choices=RECOVER_DTYPES),
        _flag("gradient_checkpointing", ("--gradient-checkpointing",), "recompute "
              "activations in the backward pass: less memory, slower", action="store_true",
              show_default=False),
        _flag("seed", ("--seed",), "seed of the training windows", type=integer, metavar="S"),
        _flag("eval_every", ("--eval-every",), "held-out perplexity every K steps (0: before "
              "and after)", LONG, type=integer, metavar="K"),
        _flag("eval_windows", ("--eval-windows",), "windows of the held-out perplexity", LONG,
              type=positive_int, metavar="W"),
        _flag("checkpoint_every", ("--checkpoint-every",), "a resumable checkpoint every K "
              "steps (0: every tenth of the run)", LONG, type=integer, metavar="K"),
    )
    def check(self, settings: RecoverSettings, job) -> None:
        settings.check()
        if settings.loss == "kd" and settings.teacher is None and not removes_weights(job):
            teacher_source(job.model)  # a one-line refusal when none can be named
        if (settings.loss == "kd" and settings.hidden_weight > 0
                and "blocks" in earlier_changes(job, self.name)):
            raise SnapPruneError("--hidden-weight compares the student's blocks with the "
                                 "teacher's one by one, and an earlier step removes blocks: "
                                 "set it to 0 (the logits are distilled all the same)")
        from ..data import check_source

        check_source(settings.data, calibration=True)

    def estimate(self, settings: RecoverSettings, probe: Probe) -> EstimatePart:
        with placed(probe.model, probe.device):
            return EstimatePart(training_seconds=training_seconds(probe.model, settings,
                                                                  probe.device))

    def begin(self, settings: RecoverSettings, context: StepContext) -> None:
        """Before any work: keep the model before the job's weight step as the teacher, make
        the training windows (refused when they share text with the evaluation), and refuse a
        stopped recovery this run would overwrite, or one it cannot continue."""
        state: dict = {"teacher": None, "directory": None}
        context.state[self.name] = state
        bench, job = context.bench, context.job
        if settings.loss == "kd" and settings.teacher is None and removes_weights(job):
            state["teacher"] = copy.deepcopy(bench.model)
        state["teacher"], state["teacher_name"] = self._teacher(settings, context, state)
        source, note = resolve_calibration_source(settings.data)
        if note:
            context.log(note.replace("calibration:", "recovery data:"))
        windows = settings.steps * settings.accumulate * settings.batch_size
        data = calibration_windows(source, bench.tokenizer, nsamples=windows,
                                   seqlen=settings.seqlen, seed=settings.seed,
                                   model=state["teacher"])
        evaluation = job.evaluation
        seqlen = capped_seqlen(bench.model, evaluation.seqlen)
        evaluated = [bench.eval_ids(s)[: (evaluation.max_windows or 10**9) * seqlen]
                     for s in evaluation.sources()]
        shared = shared_windows(data, evaluated)
        if shared:
            raise SnapPruneError(
                f"{shared} of the {windows} training windows from {source} share text with the "
                "evaluation windows: train on text the evaluation never sees")
        # The training text's token ids decide the result too: a resume on changed text (the
        # same path, new contents) is refused.
        state.update(source=source, data=data, seqlen=seqlen, fingerprint={
            **replace(job, steps=(settings,)).to_dict(), "training_ids": ids_digest(data)})
        if context.out is None:
            return
        directory = checkpoint_dir_for(context.out)
        state["directory"] = directory
        stopped = saved_step(directory)
        if context.resume:
            if stopped is None:
                raise SnapPruneError(f"nothing to resume: {directory} holds no recovery "
                                     "checkpoint; run without --resume")
            resumable(directory, run_fingerprint(state["fingerprint"], settings))
        elif stopped is not None:
            if not context.restart:
                raise SnapPruneError(
                    f"{directory} holds a recovery stopped at step {stopped}: --resume to "
                    "continue it, or --restart to discard it and start over")
            discard_checkpoint(directory)

    def _teacher(self, settings: RecoverSettings, context: StepContext, state: dict):
        if settings.loss != "kd":
            return None, ""
        if state["teacher"] is not None:
            return state["teacher"], context.job.model
        spec = settings.teacher or teacher_source(context.job.model)
        model, _, _ = load_model(spec, dtype=context.job.dtype, progress=False)
        return model, spec

    def apply(self, settings: RecoverSettings, context: StepContext, fused=None):
        """Train the workbench's model as ``settings`` say, on the windows ``begin`` made."""
        bench, state = context.bench, context.state[self.name]
        teacher = state["teacher"]
        sources = context.job.evaluation.sources()
        heldout = bench.eval_ids(sources[0]) if sources else None
        with placed(bench.model, bench.device):
            run = recover(bench.model, teacher, state["data"], settings, device=bench.device,
                          heldout=heldout, heldout_seqlen=state["seqlen"],
                          checkpoint_dir=state["directory"], resume=context.resume,
                          fingerprint=state["fingerprint"], progress=context.progress,
                          log=context.log, teacher_name=state["teacher_name"])
        run.data_source = state["source"]
        if teacher is not None:
            teacher.to("cpu")
        return run

    def finished(self, settings: RecoverSettings, context: StepContext) -> None:
        directory = context.state.get(self.name, {}).get("directory")
        if directory is not None:
            discard_checkpoint(directory)

    def kept_progress(self, out: Path) -> Path | None:
        return checkpoint_dir_for(out)

    def log_line(self, run, *, fused: bool = False) -> str:
        return (f"recovered on {run.tokens_seen:,} tokens in {run.total_seconds:.1f}s "
                f"({run.tokens_per_second:.0f} tokens/s)")

    def summary(self, run) -> str:
        kept = "structure kept exactly" if run.structure_kept else "STRUCTURE CHANGED"
        first, last, span = loss_ends(run.curve)
        return (f"recover {run.settings.loss}: {run.tokens_seen:,} tokens in "
                f"{duration(run.total_seconds)} ({run.tokens_per_second:.0f} tokens/s), loss "
                f"{first:.3f} → {last:.3f} (mean of the first and last {span} steps), "
                f"{run.frozen_zeros:,} zeros held, {kept}")

    def report(self, run) -> dict:
        """The recovery section: settings, teacher and data, the loss curve and held-out
        perplexity against tokens, speed, and whether the pruned structure was kept."""
        return {"recovery": {
            "settings": asdict(run.settings), "teacher": run.teacher,
            "data": run.data_source, "steps": run.steps, "tokens": run.tokens_seen,
            "seconds": run.total_seconds, "tokens_per_second": run.tokens_per_second,
            "resumed_at": run.resumed_at, "frozen_zeros": run.frozen_zeros,
            "structure_kept": run.structure_kept, "loss_curve": run.curve,
            "heldout_perplexity": run.heldout, "peak_memory_bytes": run.peak_memory_bytes}}

    def files(self, run, directory: Path) -> list[str]:
        return ["recovery.png"] if plot_curves(run, directory / "recovery.png") else []

    def next_step(self, job, where) -> str | None:
        if removes_weights(job) and self.name not in job.kinds:
            return (f"  snapprune recover --model {where} --out {where}-recovered"
                    "      # win back quality, structure kept")
        return None

    def compare_with(self, settings: RecoverSettings, job) -> str | None:
        if not removes_weights(job):
            return settings.teacher
        return None


def loss_ends(curve: list[dict]) -> tuple[float, float, int]:
    """The mean training loss of the first and of the last tenth of the steps (at least one
    step each) and that count: one batch's loss swings with its text far more than training
    moves it, so a single first and last step can show a rise where the model improved."""
    span = max(1, len(curve) // 10)
    return (statistics.fmean(r["loss"] for r in curve[:span]),
            statistics.fmean(r["loss"] for r in curve[-span:]), span)
