"""Whole-model solver time, Thanos against SparseGPT, side by side on the real SmolLM2-135M.

    python benchmarks/model_solver.py --json docs/measurements/model_solver.json

The solver's time does not depend on how many calibration tokens built the Hessians, so the
model's first-block inputs are captured once from a small calibration set and every run prunes
all 210 layers from the same dense weights (restored before each run) without layer errors.
Methods alternate within each repeat (this machine is shared and noisy); the table gives the
median solver seconds of each method and the ratio of medians per pattern, and the JSON every
run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from snapprune.data import calibration_windows
from snapprune.models.adapters import adapter_for
from snapprune.models.loading import load_model
from snapprune.models.prune import PruneSettings, capture_block_inputs, prune_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PATTERNS = {"unstructured": 0.5, "2:4": None, "4:8": None, "structured": 0.3}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--patterns", default="unstructured,2:4,structured")
    parser.add_argument("--methods", default="sparsegpt,thanos")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    model, tokenizer, _ = load_model(args.model, progress=False)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ids = calibration_windows(str(DATA / "c4" / "c4-validation-2k-part1.json.gz"), tokenizer,
                              nsamples=args.nsamples, seqlen=args.seqlen)
    inputs = capture_block_inputs(model, adapter_for(model).decoder_blocks(model), ids,
                                  torch.device("cpu"))
    methods, patterns = args.methods.split(","), args.patterns.split(",")
    runs = []
    for repeat in range(args.repeats):
        for pattern in patterns:
            order = methods if repeat % 2 == 0 else methods[::-1]
            for method in order:
                model.load_state_dict(dense)
                settings = PruneSettings(method, pattern=pattern, sparsity=PATTERNS[pattern])
                run = prune_model(model, None, settings, block_inputs=inputs, progress=False,
                                  layer_errors=False)
                runs.append({"method": method, "pattern": pattern, "repeat": repeat,
                             "solver_seconds": run.solver_seconds,
                             "threads": torch.get_num_threads()})
                print(json.dumps(runs[-1]), flush=True)
    lines = ["| pattern | " + " | ".join(f"{m} solver s" for m in methods)
             + f" | {methods[-1]} / {methods[0]} |", "|---|" + "--:|" * (len(methods) + 1)]
    summary = {}
    for pattern in patterns:
        medians = [statistics.median(r["solver_seconds"] for r in runs
                                     if r["method"] == m and r["pattern"] == pattern)
                   for m in methods]
        summary[pattern] = dict(zip(methods, medians, strict=True))
        lines.append(f"| {pattern} | " + " | ".join(f"{t:.1f}" for t in medians)
                     + f" | {medians[-1] / medians[0]:.2f}× |")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
