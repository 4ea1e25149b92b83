"""One process × T threads against torchrun with T processes × 1 thread, on the same model.

    python benchmarks/distributed.py --out runs/distributed            # SmolLM2-135M, T = 2
    python benchmarks/distributed.py --deterministic --one-thread --out runs/distributed_det

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


def compare(first: Path, second: Path) -> dict:
    """What the issue compares: share of equal mask entries, largest relative layer-error
    difference, perplexities."""
    report_a = json.loads((first / "snapprune_report.json").read_text())
    report_b = json.loads((second / "snapprune_report.json").read_text())
    a, b = weights(first), weights(second)
    pruned = [n for n in a if n.endswith("proj.weight")]
    equal = sum(int(((a[n] == 0) == (b[n] == 0)).sum()) for n in pruned)
    errors = {r["name"]: r["error"] for r in report_a["layers"]}
    ppl_a = next(iter(report_a["perplexity"].values()))["perplexity"]
    ppl_b = next(iter(report_b["perplexity"].values()))["perplexity"]
    return {
        "masks_equal": equal / sum(a[n].numel() for n in pruned),
        "weights_identical": all(torch.equal(a[n], b[n]) for n in a),
        "worst_layer_error_rel_diff": max(abs(r["error"] - errors[r["name"]]) / errors[r["name"]]
                                          for r in report_b["layers"]),
        "perplexities": [ppl_a, ppl_b],
        "perplexity_rel_diff": abs(ppl_b / ppl_a - 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/distributed"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--method", default="thanos")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--deterministic", action="store_true",
                        help="run both ways with snapprune's --deterministic")
    parser.add_argument("--one-thread", action="store_true",
                        help="also run one process × 1 thread: how far round-off alone moves "
                             "the result (no second process involved)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    snapprune = ["-m", "snapprune", "prune", "--model", args.model, "--method", args.method,
                 "--pattern", args.pattern, "--calib",
                 str(DATA / "c4" / "c4-validation-2k-part1.json.gz"), "--nsamples",
                 str(args.nsamples), "--seqlen", str(args.seqlen), "--eval",
                 str(DATA / "wikitext-2-raw-v1" / "wiki.test.raw"), "--eval-seqlen", "1024",
                 "--max-windows", "40", "--no-samples", "--quiet",
                 *(["--deterministic"] if args.deterministic else [])]
    one, many = args.out / "one", args.out / "many"
    wall_one = prune([sys.executable, *snapprune], one, args.procs)
    wall_many = prune([sys.executable, "-m", "torch.distributed.run",
                       f"--nproc_per_node={args.procs}", *snapprune], many, 1)
    report_one = json.loads((one / "snapprune_report.json").read_text())
    report_many = json.loads((many / "snapprune_report.json").read_text())
    result = compare(one, many)
    summary = {
        "model": args.model, "method": args.method, "pattern": args.pattern,
        "deterministic": args.deterministic,
        "calibration_tokens": args.nsamples * args.seqlen, "procs": args.procs,
        **result,
        "wall_seconds_one": wall_one, "wall_seconds_many": wall_many,
        "pruning_seconds_one": report_one["timing"]["pruning_seconds"],
        "pruning_seconds_many": report_many["timing"]["pruning_seconds"],
        "peak_memory_one": report_one["peak_memory_bytes"],
        "activation_bytes_one": report_one.get("activation_bytes"),
        "ranks": report_many["ranks"],
    }
    if args.one_thread:
        prune([sys.executable, *snapprune], args.out / "one_1thread", 1)
        summary["one_thread_vs_one"] = compare(one, args.out / "one_1thread")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    mib = 2**20
    ppl_one, ppl_many = result["perplexities"]
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
             f"{'Deterministic mode. ' if args.deterministic else ''}"
             f"Masks equal: {100 * result['masks_equal']:.4f}%; weights bit-identical: "
             f"{result['weights_identical']}; largest relative layer-error difference: "
             f"{result['worst_layer_error_rel_diff']:.2e}; perplexity difference: "
             f"{100 * result['perplexity_rel_diff']:.4f}%."]
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0

if __name__ == "__main__":
    sys.exit(main())
