"""One process × T threads against torchrun with T processes × 1 thread, on the same model.

    python benchmarks/distributed.py --out runs/distributed            # SmolLM2-135M, T = 2

Runs ``snapprune prune`` both ways with the same settings (default: Thanos 2:4, 32 × 512 C4
calibration tokens, WikiText-2 40 × 1,024), then compares what the issue asks: masks (share of
equal entries), per-layer errors (largest relative difference), perplexity, wall time, and per
rank the calibration activations and peak memory. Writes ``summary.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def prune(command: list[str], out: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([*command, "--out", str(out), "--overwrite"], check=True, env=env)
    return time.perf_counter() - start


def weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/distributed"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--method", default="thanos")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    snapprune = ["-m", "snapprune", "prune", "--model", args.model, "--method", args.method,
                 "--pattern", args.pattern, "--calib",
                 str(DATA / "c4" / "c4-validation-2k-part1.json.gz"), "--nsamples",
                 str(args.nsamples), "--seqlen", str(args.seqlen), "--eval",
                 str(DATA / "wikitext-2-raw-v1" / "wiki.test.raw"), "--eval-seqlen", "1024",
                 "--max-windows", "40", "--no-samples", "--quiet"]
    one, many = args.out / "one", args.out / "many"
    wall_one = prune([sys.executable, *snapprune], one, args.procs)
    wall_many = prune([sys.executable, "-m", "torch.distributed.run",
                       f"--nproc_per_node={args.procs}", *snapprune], many, 1)
    report_one = json.loads((one / "snapprune_report.json").read_text())
    report_many = json.loads((many / "snapprune_report.json").read_text())
    a, b = weights(one), weights(many)
    pruned = [n for n in a if n.endswith("proj.weight")]
    equal = sum(int(((a[n] == 0) == (b[n] == 0)).sum()) for n in pruned)
    total = sum(a[n].numel() for n in pruned)
    errors = {r["name"]: r["error"] for r in report_one["layers"]}
    worst = max(abs(r["error"] - errors[r["name"]]) / errors[r["name"]]
                for r in report_many["layers"])
    ppl_one = next(iter(report_one["perplexity"].values()))["perplexity"]
    ppl_many = next(iter(report_many["perplexity"].values()))["perplexity"]
    summary = {
        "model": args.model, "method": args.method, "pattern": args.pattern,
        "calibration_tokens": args.nsamples * args.seqlen, "procs": args.procs,
        "masks_equal": equal / total, "worst_layer_error_rel_diff": worst,
        "perplexity_one": ppl_one, "perplexity_many": ppl_many,
        "wall_seconds_one": wall_one, "wall_seconds_many": wall_many,
        "pruning_seconds_one": report_one["timing"]["pruning_seconds"],
        "pruning_seconds_many": report_many["timing"]["pruning_seconds"],
        "peak_memory_one": report_one["peak_memory_bytes"],
        "activation_bytes_one": report_one.get("activation_bytes"),
        "ranks": report_many["ranks"],
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    mib = 2**20
    lines = ["| run | wall s | pruning s | perplexity | activations / rank (MiB) | peak memory "
             "/ rank (MiB) |", "|---|--:|--:|--:|--:|--:|",
             f"| 1 process × {args.procs} threads | {wall_one:.0f} | "
             f"{summary['pruning_seconds_one']:.0f} | {ppl_one:.3f} | "
             f"{(summary['activation_bytes_one'] or 0) / mib:.0f} | "
             f"{summary['peak_memory_one'] / mib:.0f} |",
             f"| {args.procs} processes × 1 thread | {wall_many:.0f} | "
             f"{summary['pruning_seconds_many']:.0f} | {ppl_many:.3f} | "
             + " / ".join(f"{r['activation_bytes'] / mib:.0f}" for r in summary["ranks"]) + " | "
             + " / ".join(f"{r['peak_memory_bytes'] / mib:.0f}" for r in summary["ranks"])
             + " |", "",
             f"Masks equal: {100 * summary['masks_equal']:.4f}%; largest relative layer-error "
             f"difference: {worst:.2e}; perplexity difference: "
             f"{100 * abs(ppl_many / ppl_one - 1):.4f}%."]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
