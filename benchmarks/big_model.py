"""Models larger than memory: peak memory and time per block, streamed against in memory.

    python benchmarks/big_model.py depth --out runs/big_model               # 4, 8, 16 blocks
    python benchmarks/big_model.py big --out runs/big_model --blocks 32     # > 24 GB, fp32
    python benchmarks/big_model.py gpu --out runs/big_model_gpu --device cuda   # when lent

The checkpoints are synthetic: random weights in a real geometry (``--geometry 7b``: LLaMA-7B,
hidden 4,096, MLP 11,008, 32 heads, vocabulary 32,000; ``tiny`` for a smoke test), written
block by block as sharded safetensors with an index, so that writing one never needs more than a
block of memory. Calibration ids are random tokens (a random model has no use for text).

``depth``: for each depth, prune the same checkpoint streamed (``stream_prune``) and in memory
(``from_pretrained`` → ``prune_model`` → ``save_pretrained``), each in a fresh process whose
peak resident memory (``memory.process_peak_bytes``, polled) is recorded. Streaming should be
flat in depth; in memory it grows by one block per block. The bound each streamed peak is
compared with is the issue's: parameters outside the blocks + 2 blocks + calibration activations.

``big``: a checkpoint larger than this machine's memory (32 blocks in fp32 ≈ 27 GB): Wanda end to
end, streamed; then Thanos on its first ``--thanos-blocks`` blocks (the run is stopped by the
checkpoint test hook after them, which also shows that a run killed there resumes).

``gpu``: in memory on ``--device cuda`` (weights built from the config, nothing on disk): time
per block split into calibration passes and solver, and peak GPU memory, with the activations
kept on the device and on the CPU (pinned).

Writes ``cells.jsonl`` (one line per run) and ``table.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from snapprune.memory import process_peak_bytes, resident_bytes, total_bytes

GEOMETRIES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000},
    "tiny": {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
             "num_key_value_heads": 4, "vocab_size": 1000},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llama_config(geometry: str, blocks: int, dtype: str):
    from transformers import LlamaConfig

    return LlamaConfig(**GEOMETRIES[geometry], num_hidden_layers=blocks,
                       max_position_embeddings=4096, tie_word_embeddings=False,
                       torch_dtype=dtype)


def _shard(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def block_tensors(config, index: int, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Block ``index``'s tensors, seeded by (seed, index): any block can be regenerated alone."""
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    hidden, inter = config.hidden_size, config.intermediate_size
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    head = f"model.layers.{index}."
    out = {head + name + ".weight": (torch.randn(shape, generator=gen) * 0.02).to(dtype)
           for name, shape in shapes.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{head}{norm}.weight"] = torch.ones(hidden, dtype=dtype)
    return out


def write_checkpoint(directory: Path, geometry: str, blocks: int, dtype: str,
                     seed: int = 0) -> Path:
    """A LLaMA checkpoint with random weights: one shard per block plus one for the rest."""
    config = llama_config(geometry, blocks, dtype)
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = config.hidden_size, config.vocab_size

    def others() -> dict[str, torch.Tensor]:
        tensors = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen) * 0.02,
                   "model.norm.weight": torch.ones(hidden),
                   "lm_head.weight": torch.randn(vocab, hidden, generator=gen) * 0.02}
        return {k: v.to(torch_dtype) for k, v in tensors.items()}

    return write_sharded(directory, config, [others] + [
        lambda i=i: block_tensors(config, i, torch_dtype, seed) for i in range(blocks)])


def write_sharded(directory: Path, config, makers) -> Path:
    """``config`` and one shard per maker (each called when its shard is written, so never
    more than one shard in memory), with the index; written beside ``directory`` and renamed
    into place when whole (an existing whole one is kept)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if (directory / "model.safetensors.index.json").is_file():
        return directory
    part = directory.with_name(directory.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    config.save_pretrained(part)
    weight_map, size = {}, 0
    for index, make in enumerate(makers):
        name = _shard(index, len(makers))
        tensors = make()
        save_file(tensors, str(part / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        size += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (part / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2))
    os.replace(part, directory)
    return directory


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


# --- one run, in a fresh process --------------------------------------------------------------



def child(args: argparse.Namespace) -> None:
    """Prune ``args.source`` into ``args.dest``; print one JSON line."""
    from transformers import AutoModelForCausalLM

    from snapprune.models.prune import PruneSettings, prune_model
    from snapprune.models.streaming import stream_prune

    torch.set_num_threads(args.threads)
    print(json.dumps({"baseline_rss": resident_bytes()}), flush=True)  # even if killed later
    settings = PruneSettings(args.method, "unstructured", args.sparsity)
    vocab = json.loads((Path(args.source) / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    if args.mode == "stream":
        run = stream_prune(args.source, args.dest, lambda _model: ids, settings,
                           device=args.device, batch_size=args.batch_size, progress=False,
                           activations=args.activations, resume=args.resume,
                           layer_errors=args.layer_errors,
                           log=lambda m: print(m, file=sys.stderr, flush=True))
    else:
        model = AutoModelForCausalLM.from_pretrained(args.source, dtype="auto")
        run = prune_model(model, ids, settings, device=args.device, progress=False,
                          batch_size=args.batch_size, activations=args.activations,
                          layer_errors=args.layer_errors)
        model.save_pretrained(args.dest, max_shard_size="2GB")
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "calibration_seconds": run.calibration_seconds,
                      "solver_seconds": run.solver_seconds,
                      "achieved_sparsity": run.achieved_sparsity,
                      "activations": run.activations}), flush=True)


def measure(mode: str, source: Path, dest: Path, args: argparse.Namespace,
            crash_after: int | None = None, resume: bool = False) -> dict:
    """Run one pruning in a fresh process, polling its peak resident memory (``VmHWM``)."""
    command = [sys.executable, __file__, "_run", "--mode", mode, "--source", str(source),
               "--dest", str(dest), "--method", args.method, "--sparsity", str(args.sparsity),
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--device", args.device, "--activations", args.activations,
               *([] if args.layer_errors else ["--no-layer-errors"]),
               *(["--resume"] if resume else [])]
    env = dict(os.environ)
    if crash_after is not None:
        env["SNAPPRUNE_CRASH_AFTER_BLOCK"] = str(crash_after)
    peak = [0]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env, text=True)

    def poll() -> None:
        while process.poll() is None:
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                peak[0] = max(peak[0], process_peak_bytes(process.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    start = time.perf_counter()
    out, _ = process.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    result = {}
    for line in lines:
        result.update(json.loads(line))
    result.update({"mode": mode, "peak_rss": peak[0], "wall_seconds": wall,
                   "returncode": process.returncode})
    if process.returncode == -signal.SIGKILL and crash_after is not None:
        result.update(_from_resume_state(dest))
    elif process.returncode != 0:
        raise SystemExit(f"{mode} run failed with exit code {process.returncode}")
    return result


def _from_resume_state(dest: Path) -> dict:
    """What a run stopped by the crash hook had done, read from its resume checkpoint."""
    from snapprune.models.streaming import STATE_NAME, partial_dir

    state = json.loads((partial_dir(dest.resolve()) / STATE_NAME).read_text())
    return {"blocks_done": state["next_block"],
            "calibration_seconds": state["calibration_seconds"],
            "solver_seconds": state["solver_seconds"]}


# --- scenarios ------------------------------------------------------------------------------

def predicted_bound(config, dtype: str, args: argparse.Namespace) -> dict[str, int]:
    """The issue's bound on a streamed run: non-block parameters + 2 blocks + activations."""
    size = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    block = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * size
    others = (2 * vocab * hidden + hidden) * size
    activations = args.nsamples * args.seqlen * hidden * size
    return {"block_bytes": block, "other_bytes": others, "activation_bytes": activations,
            "bound_bytes": others + 2 * block + activations}


def run_depth(args: argparse.Namespace) -> list[dict]:
    rows = []
    for blocks in args.blocks:
        source = write_checkpoint(args.work / f"{args.geometry}-{blocks}-{args.dtype}",
                                  args.geometry, blocks, args.dtype)
        bound = predicted_bound(llama_config(args.geometry, blocks, args.dtype), args.dtype, args)
        for mode in args.modes:
            dest = args.work / f"out-{mode}-{blocks}"
            result = measure(mode, source, dest, args)
            shutil.rmtree(dest, ignore_errors=True)
            rows.append(_row("depth", blocks, source, result, bound, args))
            _emit(rows[-1], args.out)
        if not args.keep:
            shutil.rmtree(source)
    return rows


def run_big(args: argparse.Namespace) -> list[dict]:
    blocks = args.blocks[0]
    source = write_checkpoint(args.work / f"{args.geometry}-{blocks}-{args.dtype}",
                              args.geometry, blocks, args.dtype)
    config = llama_config(args.geometry, blocks, args.dtype)
    bound = predicted_bound(config, args.dtype, args)
    rows = []
    dest = args.work / "out-big"
    result = measure("stream", source, dest, args)
    result["output_bytes"] = directory_bytes(dest)
    shutil.rmtree(dest, ignore_errors=True)
    rows.append(_row("big", blocks, source, result, bound, args))
    _emit(rows[-1], args.out)
    if args.thanos_blocks:
        thanos = argparse.Namespace(**{**vars(args), "method": "thanos"})
        dest = args.work / "out-big-thanos"
        result = measure("stream", source, dest, thanos, crash_after=args.thanos_blocks - 1)
        rows.append(_row("big", blocks, source, result, bound, thanos))
        _emit(rows[-1], args.out)
        from snapprune.models.streaming import discard_partial

        discard_partial(dest)
    if not args.keep:
        shutil.rmtree(source)
    return rows


def run_gpu(args: argparse.Namespace) -> list[dict]:
    """In memory on the GPU; weights built from the config (random, in the model's dtype)."""
    from transformers import AutoModelForCausalLM

    from snapprune.models.prune import PruneSettings, prune_model

    blocks = args.blocks[0]
    config = llama_config(args.geometry, blocks, args.dtype)
    ids = torch.randint(0, config.vocab_size, (args.nsamples, args.seqlen),
                        generator=torch.Generator().manual_seed(0))
    rows = []
    for method in args.methods:
        for place in ("device", "cpu"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype]).eval()
            torch.cuda.synchronize()
            run = prune_model(model, ids, PruneSettings(method, "unstructured", args.sparsity),
                              device=args.device, batch_size=args.batch_size, progress=False,
                              activations=place)
            rows.append({"scenario": "gpu", "geometry": args.geometry, "dtype": args.dtype,
                         "blocks": blocks, "method": method, "activations": run.activations,
                         "tokens": args.nsamples * args.seqlen,
                         "calibration_s_per_block": run.calibration_seconds / blocks,
                         "solver_s_per_block": run.solver_seconds / blocks,
                         "total_s_per_block": run.total_seconds / blocks,
                         "peak_gpu_bytes": run.peak_memory_bytes,
                         "device_name": torch.cuda.get_device_name()})
            _emit(rows[-1], args.out)
            del model
    return rows


def _row(scenario: str, blocks: int, source: Path, result: dict, bound: dict,
         args: argparse.Namespace) -> dict:
    done = result.get("blocks_done", blocks)
    return {"scenario": scenario, "geometry": args.geometry, "dtype": args.dtype,
            "blocks": blocks, "blocks_done": done, "mode": result["mode"],
            "method": args.method, "checkpoint_bytes": directory_bytes(source),
            "peak_rss": result["peak_rss"], "baseline_rss": result.get("baseline_rss"),
            **bound, "seconds_per_block": result["wall_seconds"] / done,
            "calibration_s_per_block": result["calibration_seconds"] / done,
            "solver_s_per_block": result["solver_seconds"] / done,
            "achieved_sparsity": result.get("achieved_sparsity"),
            "output_bytes": result.get("output_bytes"),
            "tokens": args.nsamples * args.seqlen, "threads": args.threads,
            "memory_total": total_bytes()}


def _emit(row: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cells.jsonl", "a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    write_table(out)


def write_table(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines() if line]
    gib = 2**30
    lines = []
    disk = [r for r in rows if r["scenario"] != "gpu"]
    if disk:
        lines += ["| checkpoint | method | mode | blocks run | peak RSS (GiB) | peak − imports "
                  "(GiB) | bound (GiB) | (peak − imports) / bound | s / block | calibration s / "
                  "block | solver s / block |", "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in disk:
            own = r["peak_rss"] - (r["baseline_rss"] or 0)
            name = (f"{r['geometry']} × {r['blocks']} blocks, {r['dtype']}, "
                    f"{r['checkpoint_bytes'] / gib:.1f} GiB")
            lines.append(
                f"| {name} | {r['method']} | {r['mode']} | {r['blocks_done']} | "
                f"{r['peak_rss'] / gib:.2f} | {own / gib:.2f} | {r['bound_bytes'] / gib:.2f} | "
                f"{own / r['bound_bytes']:.2f} | {r['seconds_per_block']:.1f} | "
                f"{r['calibration_s_per_block']:.1f} | {r['solver_s_per_block']:.1f} |")
    gpu = [r for r in rows if r["scenario"] == "gpu"]
    if gpu:
        lines += ["", "| GPU | geometry | method | activations | tokens | calibration s / block "
                  "| solver s / block | peak GPU (GiB) |", "|---|---|---|---|--:|--:|--:|--:|"]
        for r in gpu:
            lines.append(
                f"| {r['device_name']} | {r['geometry']} {r['dtype']} | {r['method']} | "
                f"{r['activations']} | {r['tokens']} | {r['calibration_s_per_block']:.2f} | "
                f"{r['solver_s_per_block']:.2f} | {r['peak_gpu_bytes'] / gib:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("depth", "big", "gpu", "generate", "_run"))
    parser.add_argument("--out", type=Path, default=Path("runs/big_model"))
    parser.add_argument("--work", type=Path, default=None,
                        help="where checkpoints and outputs go (default: OUT/work)")
    parser.add_argument("--geometry", choices=tuple(GEOMETRIES), default="7b")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--blocks", default=None, help="comma-separated depths")
    parser.add_argument("--modes", default="stream,memory")
    parser.add_argument("--method", default="wanda")
    parser.add_argument("--methods", default="sparsegpt,thanos", help="gpu scenario")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--activations", default="auto")
    parser.add_argument("--thanos-blocks", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    parser.add_argument("--no-layer-errors", dest="layer_errors", action="store_false",
                        help="skip the per-layer errors (two rows x cols^2 products per layer)")
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--dest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scenario == "_run":
        child(args)
        return 0
    default_blocks = {"depth": "4,8,16", "big": "32", "gpu": "2", "generate": "4"}
    args.blocks = [int(b) for b in (args.blocks or default_blocks[args.scenario]).split(",")]
    args.modes = args.modes.split(",")
    args.methods = args.methods.split(",")
    args.work = args.work or args.out / "work"
    if args.scenario == "generate":
        for blocks in args.blocks:
            print(write_checkpoint(args.work / f"{args.geometry}-{blocks}-{args.dtype}",
                                   args.geometry, blocks, args.dtype))
        return 0
    {"depth": run_depth, "big": run_big, "gpu": run_gpu}[args.scenario](args)
    print((args.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
