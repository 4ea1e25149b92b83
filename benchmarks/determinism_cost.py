"""What deterministic mode costs, measured side by side in one process.

    python benchmarks/determinism_cost.py                  # SmolLM2-135M block 0, 32 × 512 tokens
    python benchmarks/determinism_cost.py --widths 1536 4096 11008

Two parts, each timed in both modes alternately (``--repeats`` rounds; this machine is noisy):
gathering one block's statistics on real calibration activations (float32 sums per batch
against float64 sums per window), and the Hessian's inverse factor at the given widths
(all threads against one). Prints medians and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from snapprune.data import calibration_windows
from snapprune.engine import determinism
from snapprune.engine.factor import inverse_cholesky_upper
from snapprune.models.adapters import adapter_for
from snapprune.models.blockloop import gather_layer_stats
from snapprune.models.capture import capture_block_inputs
from snapprune.models.layout import is_prunable
from snapprune.models.loading import load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(fn, deterministic: bool) -> float:
    with determinism.deterministic(deterministic):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


def side_by_side(name: str, fn, repeats: int) -> None:
    times = {False: [], True: []}
    for _ in range(repeats):
        for mode in (False, True):
            times[mode].append(timed(fn, mode))
    default, det = statistics.median(times[False]), statistics.median(times[True])
    print(f"| {name} | {default:.3f} | {det:.3f} | {det / default:.2f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--widths", type=int, nargs="*", default=[576, 1536, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"threads: {torch.get_num_threads()}")
    print("| part | default s | deterministic s | ratio |\n|---|--:|--:|--:|")
    model, tokenizer, _ = load_model(args.model, progress=False)
    ids = calibration_windows(str(DATA / "c4" / "c4-validation-2k-part1.json.gz"), tokenizer,
                              nsamples=args.nsamples, seqlen=args.seqlen)
    blocks = adapter_for(model).decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, torch.device("cpu"))
    named = {n: m for n, m in blocks[0].named_modules() if is_prunable(m)}
    side_by_side(f"statistics of block 0 ({args.nsamples} × {args.seqlen} tokens)",
                 lambda: gather_layer_stats(blocks[0], named, inputs, torch.device("cpu")),
                 args.repeats)
    for width in args.widths:
        x = torch.randn(2 * width, width, generator=torch.Generator().manual_seed(0))
        hessian = x.T @ x / width + 0.01 * torch.eye(width)
        side_by_side(f"inverse factor {width}²", lambda h=hessian: inverse_cholesky_upper(h),
                     args.repeats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
