"""What each command does once its arguments are read: run a job through ``run.execute`` and
print the summary, or evaluate, generate, sweep. Nothing here prunes, reports or saves."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from ..errors import SnapPruneError
from ..generate import DEFAULT_PROMPTS
from ..jobs import CalibrationSpec, EvaluationSpec, Execution, Job
from ..outputs import check_output_dir
from .build import given_changes, job_from_args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wants_bars(args) -> bool:
    from ..progress import bars_wanted

    return False if args.quiet else bars_wanted(None)


def destination(args) -> str | None:
    if args.no_save:
        if args.out:
            raise SnapPruneError("--out and --no-save contradict each other; choose one")
        return None
    if not args.out:
        raise SnapPruneError(f"snapprune {args.command} saves its result: pass --out DIR (or "
                             "--no-save to only evaluate and report)")
    return args.out


def run_job(job: Job, args, argv: list[str]) -> int:
    """Run a job as the command line asked and print what happened and what to do next."""
    from ..progress import library_bars
    from ..run import execute
    from ..steps import kept_progress
    from ..summary import summary_lines

    out = destination(args)
    if getattr(args, "resume", False) and getattr(args, "restart", False):
        raise SnapPruneError("--resume continues a stopped run and --restart discards it; "
                             "choose one")
    progress = wants_bars(args)
    with library_bars(progress):
        try:
            outcome = execute(job, out, overwrite=args.overwrite, json_path=args.json,
                              resume=getattr(args, "resume", False),
                              restart=getattr(args, "restart", False), progress=progress,
                              verbose=args.verbose, log=log, argv=argv)
        except KeyboardInterrupt:
            kept = kept_progress(job, Path(out).resolve()) if out is not None else []
            print("snapprune: interrupted; " + (
                f"progress is kept in {kept[0]}: run the same command with --resume" if kept
                else "nothing was written"), file=sys.stderr)
            return 130
    if outcome.report:
        print("\n".join(summary_lines(outcome)))
    return 0


def run_eval(args, argv) -> int:
    from ..outputs import json_text
    from ..progress import library_bars
    from ..run import execute

    job = job_from_args(args, None)
    progress = wants_bars(args)
    with library_bars(progress):
        outcome = execute(job, None, json_path=args.json, progress=progress, log=log,
                          argv=argv)
    payload = {"model": job.model, "perplexity": outcome.report["perplexity"]}
    zeroshot = outcome.report.get("zeroshot", {}).get("model")
    if zeroshot is not None:
        payload["zeroshot"] = zeroshot
        for name, row in zeroshot.items():
            log(f"zero-shot {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float)
                                                  else f"{k} {v}" for k, v in row.items()))
    print(json_text(payload), end="")
    return 0


def run_generate(args, argv) -> int:
    from ..generate import greedy_completions
    from ..models.loading import load_model
    from ..outputs import write_json_atomic
    from ..placement import placed
    from ..progress import library_bars

    device = vars(args).get("execution.device", Execution().device)
    Execution(device=device).check()
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    columns = {}
    progress = wants_bars(args)
    for label, spec in (("model", args.model), ("dense", args.compare)):
        if spec is None:
            continue
        with library_bars(progress):
            model, tokenizer, _ = load_model(spec, dtype=getattr(args, "dtype", "auto"),
                                             revision=getattr(args, "revision", None),
                                             progress=progress)
        with placed(model, device):
            columns[label] = greedy_completions(model, tokenizer, prompts,
                                                max_new_tokens=args.max_new_tokens,
                                                device=device)
        del model
    rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}}
            for i, p in enumerate(prompts)]
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "compare": args.compare,
                                      "generations": rows})
    for row in rows:
        print(f"> {row['prompt']}")
        for label in columns:
            text = " ".join(row[label].split())
            print(f"  {label + ':':7s}{text}" if len(columns) > 1 else f"  {text}")
        print()
    return 0


def _split(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    try:
        return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SnapPruneError(f"cannot read the list {text!r}; give comma-separated values, "
                             "e.g. 0.3,0.5") from None


def _plan_from_lists(args):
    from ..sweep import DEFAULTS, SweepPlan, expand_grid

    if not args.model:
        raise SnapPruneError("sweep needs --model (or a --grid file that names one)")
    if not args.method:
        raise SnapPruneError("sweep needs --method (a list, e.g. thanos,sparsegpt) or --grid")
    axes = {
        "method": _split(args.method), "pattern": _split(args.pattern),
        "sparsity": _split(args.sparsity, float), "alpha": _split(args.alpha, float),
        "blocksize": _split(args.blocksize, int),
        "metric": None if args.metric is None else
        [None if m == "default" else m for m in _split(args.metric)],
        "calib": _split(args.calib), "nsamples": _split(args.nsamples, int),
        "seqlen": _split(args.seqlen, int), "seed": _split(args.seed, int),
    }
    axes = {k: v for k, v in axes.items() if v is not None}
    evaluation = EvaluationSpec(**{"dense": False, **given_changes(vars(args), "evaluation")})
    grid = expand_grid("cli", axes, DEFAULTS, zeroshot=bool(evaluation.zeroshot))
    return SweepPlan(args.model, [grid], evaluation)


def run_sweep(args, argv) -> int:
    from ..sweep import load_plan, read_cells
    from ..sweep import run_sweep as sweep
    from ..sweep_report import render

    plan = load_plan(args.grid, args.model) if args.grid else _plan_from_lists(args)
    plan.execution = dataclasses.replace(plan.execution, device=args.device,
                                         activations=args.activations,
                                         deterministic=args.deterministic,
                                         batch_size=args.batch_size if not args.grid
                                         else plan.execution.batch_size)
    out = Path(args.out)
    if args.render_only:
        records = read_cells(out)
        if not records:
            raise SnapPruneError(f"no finished cells in {out}; run the sweep first")
        for path in render(out, records, plan):
            log(f"wrote {path}")
        return 0
    plan.evaluation.check()
    plan.execution.check()
    for cell, _, _ in plan.requests():
        if cell.calib is not None:
            CalibrationSpec(cell.calib, cell.nsamples, cell.seqlen, cell.seed).check()
    if out.exists() and not out.is_dir():
        raise SnapPruneError(f"--out {out} is a file; give a directory")
    if not out.parent.is_dir():
        check_output_dir(out, overwrite=False)  # makes the missing parents, or refuses
    records = sweep(plan, out, progress=wants_bars(args), log=log,
                    after_cell=lambda done: render(out, done, plan, plots=False))
    for path in render(out, records, plan):
        log(f"wrote {path}")
    return 0
