"""Prune the real SmolLM2-135M with every method × pattern; perplexity and wall times.

    python benchmarks/model_table.py --out runs/smollm2_table [--nsamples 32 --seqlen 512
        --eval-windows 40 --eval-seqlen 1024]

Loads the model once, evaluates it dense, then for each cell restores the dense weights,
samples the calibration windows (same seed for every cell), prunes, and evaluates WikiText-2
test perplexity. Writes one JSON line per cell (``cells.jsonl``) and a Markdown table
(``table.md``). The calibration windows and evaluation budget are fixed up front; nothing is
tuned on the numbers reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models.loading import load_model
from snapprune.models.settings import PruneSettings
from snapprune.run import execute
from snapprune.workbench import Workbench

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CELLS = [
    ("unstructured", 0.5, 0.0),
    ("2:4", None, 0.0),
    ("structured", 0.3, 0.0),
]
METHODS = ["magnitude", "wanda", "sparsegpt", "thanos"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default=str(DATA / "c4" / "c4-validation-2k-part1.json.gz"))
    parser.add_argument("--eval", default=str(DATA / "wikitext-2-raw-v1" / "wiki.test.raw"))
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--eval-seqlen", type=int, default=1024)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--patterns", default=",".join(c[0] for c in CELLS),
                        help="which of the table's patterns to run (default: all)")
    parser.add_argument("--out", default="runs/smollm2_table")
    parser.add_argument("--render", metavar="CELLS_JSONL",
                        help="only re-render table.md from an earlier run's cells.jsonl")
    args = parser.parse_args()
    if args.render:
        rows = [json.loads(line) for line in Path(args.render).read_text().splitlines()]
        write_table(rows, Path(args.render).with_name("table.md"))
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, _ = load_model(args.model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    bench = Workbench(model, tokenizer, progress=False)
    calibration = CalibrationSpec(args.calib, args.nsamples, args.seqlen, seed=0)
    evaluation = EvaluationSpec(ppl=(args.eval,), seqlen=args.eval_seqlen,
                                max_windows=args.eval_windows, dense=False)

    def ppl() -> float:
        return bench.evaluate(evaluation).perplexity[args.eval].perplexity

    rows = [{"method": "dense", "pattern": "-", "sparsity": 0.0, "ppl": ppl(),
             "prune_seconds": 0.0, "solver_seconds": 0.0}]
    print(json.dumps(rows[0]), flush=True)
    for pattern, sparsity, alpha in CELLS:
        if pattern not in args.patterns.split(","):
            continue
        for method in args.methods.split(","):
            model.load_state_dict(dense_state)
            settings = PruneSettings(method=method, pattern=pattern, sparsity=sparsity,
                                     alpha=alpha)
            job = Job(model=args.model, steps=(settings,), calibration=calibration,
                      evaluation=evaluation, output=OutputSpec(samples=False))
            outcome = execute(job, None, bench=bench, progress=False, announce=False)
            run = outcome.run
            errors = [r.error for r in run.layers if r.error == r.error]
            row = {"method": method, "pattern": pattern, "sparsity": run.achieved_sparsity,
                   "alpha": alpha, "prune_seconds": run.total_seconds,
                   "ppl": outcome.evaluated.perplexity[args.eval].perplexity,
                   "solver_seconds": run.solver_seconds,
                   "calibration_seconds": run.calibration_seconds}
            if errors:  # magnitude pruning runs no calibration: no layer errors
                row["mean_layer_error"] = sum(errors) / len(errors)
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(out / "cells.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    write_table(rows, out / "table.md")
    print(f"torch threads: {torch.get_num_threads()}")
    return 0


def write_table(rows: list[dict], path: Path) -> None:
    """Markdown table. Pruning time is calibration forward passes + solver: the whole of
    ``prune_model`` but for a few seconds of bookkeeping, model loading and evaluation excluded."""
    lines = ["| method | pattern | sparsity | WikiText-2 ppl | calibration passes s | solver s | "
             "mean layer error |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        err = f"{r['mean_layer_error']:.4f}" if "mean_layer_error" in r else "-"
        calib = f"{r['calibration_seconds']:.1f}" if "calibration_seconds" in r else "-"
        lines.append(f"| {r['method']} | {r['pattern']} | {r['sparsity']:.3f} | {r['ppl']:.2f} "
                     f"| {calib} | {r['solver_seconds']:.1f} | {err} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
