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
from snapprune.engine.thanos_update import padded_solve

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


def solve_costs(device: str, repeats: int = 5) -> dict[str, float]:
    """Fit ``thanos.segment_cost``'s constants: time batched solves of ``n`` rows padded to
    ``q`` unknowns (the real ``padded_solve``, gathering included), least squares on the
    relative error of ``t = call + n·(q²·a + q³·b)``."""
    from snapprune.engine import thanos_update as thanos

    gen = torch.Generator().manual_seed(0)
    width = 128
    base = torch.randn(width, 2 * width, generator=gen)
    r_block = (base @ base.T / width + 0.1 * torch.eye(width)).to(device)
    rows_x, times = [], []
    for q in (8, 16, 32, 64, 96, 128):
        for n in (16, 128, 1024, 4096):
            weights = torch.randn(n, width, generator=gen).to(device)
            mask = torch.zeros(n, width, dtype=torch.bool, device=device)
            mask[:, :q] = True
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                thanos.padded_solve(r_block, weights, mask, uniform=q)
                if device != "cpu":
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - start)
            rows_x.append([1.0, n * q * q, n * q**3])
            times.append(statistics.median(samples))
    # Relative residuals: small systems matter as much as large ones.
    weight = 1.0 / torch.tensor(times, dtype=torch.float64)[:, None]
    fit = torch.linalg.lstsq(torch.tensor(rows_x, dtype=torch.float64) * weight,
                             torch.ones_like(weight)).solution
    call, q2, q3 = (max(0.0, float(v)) for v in fit.squeeze(1))
    return {"SEGMENT_CALL_SECONDS": call, "SEGMENT_ROW_Q2_SECONDS": q2,
            "SEGMENT_ROW_Q3_SECONDS": q3}


def run(shapes, tokens: int, repeats: int, blocksize: int, device: str,
        dtype: torch.dtype = torch.float32) -> list[dict]:
    rows_out = []
    for rows, cols in shapes:
        stats = llm_like_inputs(cols, tokens, seed=rows * 7 + cols)
        if device != "cpu":
            stats._xxt, stats._sq = stats._xxt.to(device), stats._sq.to(device)
        weight = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(cols))
                  / cols**0.5).to(device, dtype)
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
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the weights' dtype (the engine computes in float32 either way)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--solve-costs", action="store_true",
                        help="only fit the batched-solve cost model (thanos.segment_cost)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.solve_costs:
        for name, value in solve_costs(args.device, args.repeats).items():
            print(f"{name} = {value:.3g}")
        return 0
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    print(f"# torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"N={args.tokens}, B={args.blocksize}, median of {args.repeats}")
    print_header()
    cells = run(shapes, args.tokens, args.repeats, args.blocksize, args.device,
                getattr(torch, args.dtype))
    if args.json:
        meta = {"torch": torch.__version__, "device": args.device, "threads":
                torch.get_num_threads(), "tokens": args.tokens, "blocksize": args.blocksize,
                "dtype": args.dtype,
                "repeats": args.repeats, "machine": platform.platform(), "python": sys.version}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "cells": cells}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
