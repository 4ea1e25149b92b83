"""A mixture of experts larger than this machine's memory, pruned streamed, killed and resumed.

    python benchmarks/moe_stream.py --out runs/moe_stream                  # ~29 GB, bf16
    python benchmarks/moe_stream.py --out runs/moe_smoke --geometry tiny   # a smoke test

The checkpoint is synthetic: random weights in Qwen3-30B-A3B's block geometry (hidden 2,048,
32 query / 4 key-value heads of 128, 128 experts of width 768, 8 per token) with fewer blocks
(``--blocks``, 24 by default: ≈ 29 GB in bfloat16), stored as transformers stores Qwen3-MoE
(one tensor per expert and projection), one shard per block, written block by block. It is
pruned with ``stream_prune`` (Wanda by default: each expert on its own routed tokens, starved
experts on every token) in a fresh process that is killed (SIGKILL, the checkpoint test hook)
after ``--kill-after`` blocks, then resumed in another; each process's peak resident memory is
polled (``benchmarks/big_model.measure``). Writes ``cells.jsonl`` and ``table.md`` under
``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from big_model import directory_bytes, measure, write_sharded

from snapprune.memory import total_bytes

GEOMETRIES = {
    "30b-a3b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4,
                    head_dim=128, moe_intermediate_size=768, intermediate_size=6144,
                    num_experts=128, num_experts_per_tok=8, vocab_size=32000),
    "tiny": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 moe_intermediate_size=64, intermediate_size=256, num_experts=16,
                 num_experts_per_tok=4, vocab_size=1000),
}


def moe_config(geometry: str, blocks: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**GEOMETRIES[geometry], num_hidden_layers=blocks,
                          max_position_embeddings=4096, norm_topk_prob=True,
                          tie_word_embeddings=False, dtype="bfloat16")


def block_tensors(config, index: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Block ``index``'s tensors under the checkpoint's names, seeded by (seed, index)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    hidden, head = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * head, config.num_key_value_heads * head
    width = config.moe_intermediate_size
    shapes = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, q),
              "mlp.gate": (config.num_experts, hidden)}
    for e in range(config.num_experts):
        shapes[f"mlp.experts.{e}.gate_proj"] = (width, hidden)
        shapes[f"mlp.experts.{e}.up_proj"] = (width, hidden)
        shapes[f"mlp.experts.{e}.down_proj"] = (hidden, width)
    prefix = f"model.layers.{index}."
    out = {prefix + name + ".weight": (torch.randn(shape, generator=gen) * 0.02).bfloat16()
           for name, shape in shapes.items()}
    for norm, size in (("input_layernorm", hidden), ("post_attention_layernorm", hidden),
                       ("self_attn.q_norm", head), ("self_attn.k_norm", head)):
        out[f"{prefix}{norm}.weight"] = torch.ones(size, dtype=torch.bfloat16)
    return out


def write_checkpoint(directory: Path, geometry: str, blocks: int) -> Path:
    """The synthetic checkpoint, one shard per block plus one for the rest (never more than a
    block in memory); renamed into place when whole."""
    config = moe_config(geometry, blocks)
    gen = torch.Generator().manual_seed(0)
    hidden, vocab = config.hidden_size, config.vocab_size

    def others() -> dict[str, torch.Tensor]:
        return {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen)
                                              * 0.02).bfloat16(),
                "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).bfloat16()}

    return write_sharded(directory, config, [others] + [
        lambda i=i: block_tensors(config, i) for i in range(blocks)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/moe_stream"))
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--geometry", choices=tuple(GEOMETRIES), default="30b-a3b")
    parser.add_argument("--blocks", type=int, default=24)
    parser.add_argument("--kill-after", type=int, default=None,
                        help="kill the first process after this many blocks (default: half)")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--keep", action="store_true", help="keep checkpoint and output")
    args = parser.parse_args()
    work = args.work or args.out / "work"
    source = write_checkpoint(work / f"qwen3moe-{args.geometry}-{args.blocks}", args.geometry,
                              args.blocks)
    dest = work / "out"
    shutil.rmtree(dest, ignore_errors=True)
    options = argparse.Namespace(
        method=args.method, sparsity=args.sparsity, nsamples=args.nsamples,
        seqlen=args.seqlen, batch_size=8, threads=args.threads, device="cpu",
        activations="auto", layer_errors=False)
    kill_after = args.kill_after or args.blocks // 2
    killed = measure("stream", source, dest, options, crash_after=kill_after - 1)
    resumed = measure("stream", source, dest, options, resume=True)
    rows = []
    for part, result in (("killed", killed), ("resumed", resumed)):
        rows.append({"part": part, "geometry": args.geometry, "blocks": args.blocks,
                     "method": args.method, "checkpoint_bytes": directory_bytes(source),
                     "memory_total": total_bytes(), "returncode": result["returncode"],
                     "peak_rss": result["peak_rss"], "baseline_rss": result.get("baseline_rss"),
                     "wall_seconds": result["wall_seconds"],
                     "blocks_done": result.get("blocks_done", args.blocks),
                     "calibration_seconds": result.get("calibration_seconds"),
                     "solver_seconds": result.get("solver_seconds"),
                     "achieved_sparsity": result.get("achieved_sparsity"),
                     "output_bytes": directory_bytes(dest) if dest.exists() else None,
                     "tokens": args.nsamples * args.seqlen, "threads": args.threads})
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "cells.jsonl", "a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    gib = 2**30
    lines = ["| process | blocks | returncode | peak RSS (GiB) | wall (s) | sparsity |",
             "|---|--:|--:|--:|--:|--:|"]
    for row in rows:
        sparsity = row["achieved_sparsity"]
        lines.append(f"| {row['part']} | {row['blocks_done']} of {row['blocks']} | "
                     f"{row['returncode']} | {row['peak_rss'] / gib:.2f} | "
                     f"{row['wall_seconds']:.0f} | "
                     f"{'' if sparsity is None else f'{sparsity:.3f}'} |")
    lines.append(f"\ncheckpoint {rows[0]['checkpoint_bytes'] / gib:.1f} GiB, machine memory "
                 f"{rows[0]['memory_total'] / gib:.1f} GiB, {args.nsamples}×{args.seqlen} "
                 f"calibration tokens, {args.threads} threads")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.keep:
        shutil.rmtree(source)
        shutil.rmtree(dest, ignore_errors=True)
    return 0 if resumed["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
