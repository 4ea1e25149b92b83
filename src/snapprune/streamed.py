"""The run path for a model larger than memory: a single step of a kind that streams reads,
changes and writes one block at a time (``Step.stream``); the report and recipe go into the
output before it is renamed into place, as for any run."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from .engine import determinism
from .errors import SnapPruneError
from .eval.perplexity import capped_seqlen
from .models import collectives, decilm
from .outputs import write_json_atomic
from .steps import REGISTRY, step_for


def _refuse(job, out: Path | None) -> None:
    kinds = " or ".join(s.name for s in REGISTRY.values() if s.streams)
    if len(job.steps) != 1 or not step_for(job.steps[0]).streams:
        raise SnapPruneError(f"streaming runs one {kinds} step; the other steps need the model "
                             "in memory")
    if out is None:
        raise SnapPruneError("a streamed run writes the model block by block: give it an "
                             "output directory (--out DIR)")
    if job.evaluation.ppl or job.evaluation.zeroshot:
        raise SnapPruneError("a streamed model is never whole in memory, so it is not evaluated "
                             "here: drop --eval/--zeroshot and run snapprune eval on the "
                             "output")
    if job.calibration.source == "self":
        raise SnapPruneError("calibration source self generates text with the whole model; a "
                             "streamed run needs a text source (a local file, c4-sample, c4)")
    if job.output.format != "hf":
        raise SnapPruneError("a streamed run writes safetensors (format hf); convert the "
                             "output afterwards")


def execute_streamed(job, out: Path | None, *, notes, json_path, resume, restart, progress,
                     verbose, log, argv, started, outcome):
    """Run the job's one streaming step from the model's shards into ``out``."""
    from transformers import AutoTokenizer

    from .data import calibration_windows
    from .jobs import recipe_text
    from .models.checkpoint_files import check_checkpoint
    from .models.distributed import rank_device
    from .models.loading import resolve_model
    from .models.streaming import discard_partial, partial_dir
    from .outputs import RECIPE_NAME, REPORT_NAME
    from .report import build_report

    _refuse(job, out)
    settings = job.steps[0]
    step = step_for(settings)
    source = resolve_model(job.model)
    if source.gguf_file:
        raise SnapPruneError("streaming reads safetensors; convert the GGUF file first (load it "
                             "with transformers and save_pretrained, or prune it in memory "
                             "with --no-stream)")
    path = source.path
    if source.is_local and decilm.read_config(path) is not None:
        raise SnapPruneError("streaming builds one standard config's blocks, and this is a "
                             "Nemotron-NAS checkpoint (blocks of different shapes): run it "
                             "in memory (--no-stream)")
    if not source.is_local:
        from huggingface_hub import snapshot_download

        from .hub import require_hub

        require_hub(f"model {job.model!r}", "pass a local directory")
        path = snapshot_download(job.model, revision=job.revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
        check_checkpoint(path)  # a local directory was checked by resolve_model
    group = collectives.current()
    for note in notes:
        if group.is_main:
            log(note)
    tokenizer = AutoTokenizer.from_pretrained(path)
    outcome.tokenizer = tokenizer
    spec = job.calibration
    made: dict[str, torch.Tensor] = {}

    def calibration(model):
        ids = calibration_windows(spec.source, tokenizer, nsamples=spec.nsamples,
                                  seqlen=capped_seqlen(model, spec.seqlen), seed=spec.seed)
        made["ids"] = ids
        return ids

    def finish(directory: Path, run) -> None:
        outcome.results = []
        outcome.add(step, settings, run)
        outcome.seconds["total_seconds"] = time.perf_counter() - started
        outcome.report = build_report(outcome, argv=argv, calibration_ids=made.get("ids"),
                                      saved_to=out, streamed=True)
        write_json_atomic(directory / REPORT_NAME, outcome.report)
        (directory / RECIPE_NAME).write_text(recipe_text(job), encoding="utf-8")

    fingerprint = replace(job, execution=replace(job.execution, stream=True)).to_dict()
    try:
        with determinism.deterministic(job.execution.deterministic):
            run = step.stream(settings, path, out, calibration, execution=job.execution,
                              progress=progress, log=log if verbose else None, resume=resume,
                              restart=restart, finish=finish, fingerprint=fingerprint,
                              device=rank_device(job.execution.device))
    except SnapPruneError:
        discard_partial(out)
        raise
    except KeyboardInterrupt:
        log(f"finished blocks are kept in {partial_dir(out)}: run the same command with "
            "--resume to continue")
        raise
    finally:
        if group.active:
            group.leave()
    if not outcome.results:
        outcome.add(step, settings, run)
    if group.is_main:
        outcome.saved = out
        log(step.log_line(run))
        if json_path is not None:
            write_json_atomic(json_path, outcome.report)
    return outcome
