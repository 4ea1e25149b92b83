"""Layer-level speed and reconstruction error of every method, measured side by side.

    python benchmarks/layer_speed.py [--json PATH] [--repeats R] [--shapes 576x576,...]

For each layer shape (rows × cols = out × in) it draws N token inputs of heterogeneous scale
(log-normal per-channel scales, a few outlier channels, correlated features, as in LLM
activations), then runs every method × pattern on the same weight and statistics, interleaved
and repeated, and reports the median seconds, the Thanos/SparseGPT time ratio and the relative
reconstruction error ``‖(Ŵ−W)X‖² / ‖WX‖²``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from snapprune import LayerStats, prune_weight
from snapprune.engine.factor import damped_hessian
from snapprune.engine.masks import lowest_k_mask, target_count
from snapprune.engine.thanos import padded_solve

SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 2048), (1024, 4096)]
METHODS = ["magnitude", "wanda", "sparsegpt", "thanos"]
PATTERNS = [("unstructured", 0.5), ("2:4", None), ("4:8", None), ("structured", 0.3)]


def llm_like_inputs(cols: int, tokens: int, seed: int) -> LayerStats:
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(0.8 * torch.randn(cols, generator=gen))
    outliers = torch.randperm(cols, generator=gen)[: max(1, cols // 100)]
    scales[outliers] *= 20.0
    mixing = torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen) / cols**0.5
    stats = LayerStats(cols)
    for start in range(0, tokens, 2048):
        n = min(2048, tokens - start)
        stats.add((torch.randn(n, cols, generator=gen) @ mixing) * scales)
    return stats


def thanos_reinverting(weight: torch.Tensor, stats: LayerStats, sparsity: float,
                       blocksize: int) -> float:
    """Seconds of Thanos done the research code's way: a fresh ``inverse(H[i1:, i1:])`` per
    block (same masks, same batched solves), to measure what the Cholesky identity saves."""
    start = time.perf_counter()
    w = weight.float().clone()
    _rows, cols = w.shape
    h = damped_hessian(stats.hessian.to(w.device), 0.01)[0]
    sq = stats.sq_norms.to(w.device).float()
    total, removed = target_count(sparsity, w.numel()), 0
    for i1 in range(0, cols, blocksize):
        i2 = min(cols, i1 + blocksize)
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h[i1:, i1:]))
        block = lowest_k_mask(w[:, i1:].square() * sq[i1:], total - removed)[:, : i2 - i1]
        removed += int(block.sum())
        lam = padded_solve(hinv[: i2 - i1, : i2 - i1], w[:, i1:i2], block)
        w[:, i1:] -= lam @ hinv[: i2 - i1]
        w[:, i1:i2][block] = 0.0
    if w.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(shapes, tokens: int, repeats: int, blocksize: int, device: str) -> list[dict]:
    rows_out = []
    for rows, cols in shapes:
        stats = llm_like_inputs(cols, tokens, seed=rows * 7 + cols)
        if device != "cpu":
            stats._xxt, stats._sq = stats._xxt.to(device), stats._sq.to(device)
        weight = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols))
                  / cols**0.5).to(device)
        times: dict[tuple[str, str], list[float]] = {}
        errors: dict[tuple[str, str], float] = {}
        for _ in range(repeats):  # interleaved: every cell sees the same machine noise
            for pattern, sparsity in PATTERNS:
                for method in METHODS:
                    res = prune_weight(weight, stats, method=method, pattern=pattern,
                                       sparsity=sparsity, blocksize=blocksize)
                    times.setdefault((method, pattern), []).append(res.seconds)
                    errors[(method, pattern)] = res.error
        for pattern, _ in PATTERNS:
            cell = {"shape": f"{rows}x{cols}", "pattern": pattern}
            for method in METHODS:
                cell[f"{method}_s"] = statistics.median(times[(method, pattern)])
                cell[f"{method}_err"] = errors[(method, pattern)]
            cell["thanos_over_sparsegpt"] = cell["thanos_s"] / cell["sparsegpt_s"]
            if pattern == "unstructured":
                cell["thanos_reinverting_s"] = thanos_reinverting(weight, stats, 0.5, blocksize)
            rows_out.append(cell)
            print_row(cell)
    return rows_out


def print_header() -> None:
    print("| shape | pattern | " + " | ".join(f"{m} s" for m in METHODS)
          + " | Thanos/SparseGPT | " + " | ".join(f"{m} err" for m in METHODS)
          + " | Thanos re-inverting per block s |")
    print("|" + "---|" * (4 + 2 * len(METHODS)))


def print_row(cell: dict) -> None:
    times = " | ".join(f"{cell[f'{m}_s']:.3f}" for m in METHODS)
    errs = " | ".join(f"{cell[f'{m}_err']:.4f}" for m in METHODS)
    reinverting = cell.get("thanos_reinverting_s")
    reinverting = f"{reinverting:.3f}" if reinverting is not None else "-"
    print(f"| {cell['shape']} | {cell['pattern']} | {times} | "
          f"{cell['thanos_over_sparsegpt']:.2f}x | {errs} | {reinverting} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help="comma-separated ROWSxCOLS (default: the five standard)")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration token vectors N")
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    parser.add_argument("--blocksize", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"# torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"N={args.tokens}, B={args.blocksize}, median of {args.repeats}")
    print_header()
    cells = run(shapes, args.tokens, args.repeats, args.blocksize, args.device)
    if args.json:
        meta = {"torch": torch.__version__, "device": args.device, "threads":
                torch.get_num_threads(), "tokens": args.tokens, "blocksize": args.blocksize,
                "repeats": args.repeats, "machine": platform.platform(), "python": sys.version}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cells": cells}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
