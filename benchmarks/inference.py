"""Inference speed, memory and quality of shrunk models against dense and zero-masked ones.

    python benchmarks/inference.py --out runs/inference            # CPU, SmolLM2-135M
    python benchmarks/inference.py --device cuda --dtype bfloat16  # on a GPU (adds 2:4 kernels)

Builds, from one loaded model: the dense model; zero-masked models (Thanos 50% unstructured and
2:4: same shapes, zeros in place); and shrunk models (MLP neurons cut out) at each width for
each method. Speed depends only on shapes, so it is timed once per width (on the Thanos model);
perplexity is measured for every method × width. Per timed model: prefill tokens/s (one forward
pass of 512 and 2,048 tokens), greedy decode tokens/s with the KV cache (batch 1 and 8, 128 new
tokens), peak memory of a fresh process that loads the saved model and runs it (over the same
process's baseline before loading), parameters and safetensors bytes. Timings are medians of
``--repeats`` rounds, the models interleaved within each round (this machine is shared and
noisy). The prediction each speed-up is compared with: prefill by multiply-accumulates per token
(every linear layer, the LM head and attention over the context), decode by bytes read per token
(weights and KV cache), memory by parameter bytes.

Writes ``cells.jsonl`` (one line per model), ``table.md`` and ``ppl_vs_speedup.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from snapprune.jobs import CalibrationSpec, EvaluationSpec, Job, OutputSpec
from snapprune.models.loading import load_model
from snapprune.models.settings import PruneSettings, ShrinkSettings
from snapprune.outputs import REPORT_NAME, save_directory, write_json_atomic
from snapprune.run import execute
from snapprune.workbench import Workbench

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("magnitude", "wanda", "sparsegpt", "thanos")


def macs_per_token(config, context: int) -> float:
    """Multiply-accumulates per token of a LLaMA-style decoder at a given context length."""
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attn_proj = hidden * head_dim * (2 * heads + 2 * kv)  # q, o and k, v
    mlp = 3 * hidden * inter
    scores = 2 * heads * head_dim * context  # QKᵀ and AV over the context
    return config.num_hidden_layers * (attn_proj + mlp + scores) + hidden * config.vocab_size


def bytes_per_decode_token(model, context: int, batch: int) -> float:
    """Weights read once per step, shared by the batch, plus each sequence's KV cache."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) * size
    kv = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * size
    return (weights + batch * kv) / batch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    model(ids, use_cache=False)
    _sync(device)
    return time.perf_counter() - t


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new_tokens: int, device: str) -> float:
    """Seconds per decode step (prefill of the prompt subtracted)."""
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=0,
                  attention_mask=torch.ones_like(prompt))
    _sync(device)
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kwargs)
    _sync(device)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    _sync(device)
    return (time.perf_counter() - t - first) / (new_tokens - 1)


def measure_speed(models: dict[str, torch.nn.Module], args) -> dict[str, dict]:
    """Median prefill and decode throughput per model, models interleaved in every round."""
    gen = torch.Generator().manual_seed(0)
    vocab = next(iter(models.values())).config.vocab_size
    long = torch.randint(0, vocab, (1, 2048), generator=gen).to(args.device)
    prompt1 = long[:, :32]
    prompt8 = torch.randint(0, vocab, (8, 32), generator=gen).to(args.device)
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in models}
    for model in models.values():  # warm-up
        prefill_seconds(model, long[:, :128], args.device)
    for round_ in range(args.repeats):
        for name, model in models.items():
            s = samples[name]
            for length in (512, 2048):
                s.setdefault(f"prefill_{length}", []).append(
                    length / prefill_seconds(model, long[:, :length], args.device))
            s.setdefault("decode_b1", []).append(
                1 / decode_seconds(model, prompt1, args.new_tokens, args.device))
            s.setdefault("decode_b8", []).append(
                8 / decode_seconds(model, prompt8, args.new_tokens, args.device))
        print(f"speed round {round_ + 1}/{args.repeats} done", flush=True)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def probe(path: str, device: str) -> int:
    """In this (fresh) process: peak RSS increase from loading ``path`` and running it."""
    from transformers import AutoModelForCausalLM

    from snapprune.memory import process_peak_bytes, resident_bytes

    base = resident_bytes()
    model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 512)).to(device)
    with torch.no_grad():
        model(ids, use_cache=False)
        model.generate(ids[:, :32], max_new_tokens=16, min_new_tokens=16, do_sample=False,
                       pad_token_id=0, attention_mask=torch.ones_like(ids[:, :32]))
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    # This process's own peak (VmHWM where kept): getrusage's ru_maxrss would carry the
    # parent's peak across fork and exec.
    return process_peak_bytes(os.getpid()) - base


def peak_memory(path: Path, device: str) -> int:
    out = subprocess.run([sys.executable, __file__, "--probe", str(path), "--device", device],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def semi_structured(model) -> str:
    """Swap 2:4 weights for torch's semi-structured sparse tensors (CUDA only)."""
    from torch.sparse import to_sparse_semi_structured

    try:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] != \
                    model.config.vocab_size:
                w = module.weight.data
                if ((w.reshape(w.shape[0], -1, 4) == 0).sum(2) >= 2).all():
                    module.weight = torch.nn.Parameter(to_sparse_semi_structured(w))
        return "semi-structured"
    except Exception as exc:  # kernel missing for this GPU or dtype: say so in the table
        return f"unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default=str(DATA / "c4" / "c4-validation-2k-part1.json.gz"))
    parser.add_argument("--eval", default=str(DATA / "wikitext-2-raw-v1" / "wiki.test.raw"))
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=12)
    parser.add_argument("--widths", default="0.1,0.2,0.3,0.4,0.5",
                        help="MLP fractions removed (the speed-up curve)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--build-threads", type=int, default=None,
                        help="torch threads while building the models (timing uses all)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="runs/inference")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--remeasure-memory", action="store_true",
                        help="only measure peak memory again for the timed models of --out")
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite table.md and the plot from --out's cells.jsonl")
    args = parser.parse_args()
    if args.probe:
        print(probe(args.probe, args.device))
        return 0
    if args.remeasure_memory or args.render_only:
        out = Path(args.out)
        rows = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
        for row in rows:
            if args.remeasure_memory and "prefill_512" in row \
                    and (out / "models" / row["model"]).is_dir():
                row["peak_memory_bytes"] = peak_memory(out / "models" / row["model"],
                                                       args.device)
        (out / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_table(rows, out / "table.md")
        plot(rows, out / "ppl_vs_speedup.png")
        return 0

    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    timing_threads = torch.get_num_threads()
    if args.build_threads:
        torch.set_num_threads(args.build_threads)
    model, tokenizer, _ = load_model(args.model, dtype=args.dtype, progress=False)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = CalibrationSpec(args.calib, args.nsamples, args.seqlen, 0)
    evaluation = EvaluationSpec(ppl=(args.eval,), seqlen=1024, max_windows=args.eval_windows,
                                dense=False)

    def run(step):
        job = Job(model=args.model, steps=(step,), calibration=calibration,
                  evaluation=evaluation, output=OutputSpec(samples=False))
        return execute(job, None, bench=bench, progress=False, announce=False)
    rows: list[dict] = []
    timed: dict[str, torch.nn.Module] = {}

    def record(name: str, kind: str, method: str, width: float, pruned: torch.nn.Module,
               ppl: float, keep: bool) -> None:
        path = out / "models" / name
        def fill(tmp: Path) -> None:
            pruned.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / REPORT_NAME, {"benchmark": name})

        save_directory(path, fill, overwrite=True)
        params = {id(p): p for p in pruned.parameters()}.values()
        row = {"model": name, "kind": kind, "method": method, "mlp_removed": width,
               "ppl": ppl, "parameters": sum(p.numel() for p in params),
               "safetensors_bytes": (path / "model.safetensors").stat().st_size,
               "macs_512": macs_per_token(pruned.config, 256),
               "macs_2048": macs_per_token(pruned.config, 1024),
               "decode_bytes_b1": bytes_per_decode_token(pruned, 64, 1),
               "decode_bytes_b8": bytes_per_decode_token(pruned, 64, 8)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if keep:
            timed[name] = pruned.to(args.device)
        else:
            shutil.rmtree(path)

    bench = Workbench(model, tokenizer, progress=False)
    ppl = bench.evaluate(evaluation).perplexity[args.eval].perplexity
    record("dense", "dense", "-", 0.0, copy.deepcopy(model), ppl, True)
    for pattern, sparsity in (("unstructured", 0.5), ("2:4", None)):
        model.load_state_dict(dense_state)
        outcome = run(PruneSettings("thanos", pattern, sparsity))
        name = f"masked-{pattern.replace(':', 'of')}"
        record(name, f"zeros {pattern}", "thanos", 0.0, copy.deepcopy(model),
               outcome.evaluated.perplexity[args.eval].perplexity, True)
    widths = [float(w) for w in args.widths.split(",")]
    for width in widths:
        for method in args.methods.split(","):
            model.load_state_dict(dense_state)
            bench.model = model
            outcome = run(ShrinkSettings(method, mlp=width))
            record(f"{method}-mlp{round(width * 100)}", "shrunk", method, width, bench.model,
                   outcome.evaluated.perplexity[args.eval].perplexity, method == "thanos")
            bench.model = model

    if args.device.startswith("cuda") and "masked-2of4" in timed:
        sparse = copy.deepcopy(timed["masked-2of4"])
        status = semi_structured(sparse)
        if status == "semi-structured":
            timed["masked-2of4-kernel"] = sparse
        print(f"2:4 kernels: {status}", flush=True)
    torch.set_num_threads(timing_threads)
    print(f"speed phase: {len(timed)} models, {timing_threads} threads", flush=True)
    speed = measure_speed(timed, args)
    for row in rows:
        if row["model"] in speed:
            row.update(speed[row["model"]])
            row["peak_memory_bytes"] = peak_memory(out / "models" / row["model"], args.device)
    rows += [{"model": k, "kind": "zeros 2:4 + kernel", **v} for k, v in speed.items()
             if k.endswith("-kernel")]
    with open(out / "cells.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    write_table(rows, out / "table.md")
    plot(rows, out / "ppl_vs_speedup.png")
    print(f"torch threads: {torch.get_num_threads()}, device {args.device}, dtype {args.dtype}")
    return 0


def write_table(rows: list[dict], path: Path) -> None:
    dense = next(r for r in rows if r["model"] == "dense")
    timed = [r for r in rows if "prefill_512" in r]
    lines = [
        "| model | WikiText-2 ppl | parameters | safetensors MB | prefill 512 tok/s | "
        "prefill 2048 tok/s | decode b1 tok/s | decode b8 tok/s | peak memory MB |",
        "|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        lines.append(
            f"| {r['model']} | {r.get('ppl', float('nan')):.2f} | {r.get('parameters', 0):,} | "
            f"{r.get('safetensors_bytes', 0) / 2**20:.0f} | {r['prefill_512']:.0f} | "
            f"{r['prefill_2048']:.0f} | {r['decode_b1']:.1f} | {r['decode_b8']:.1f} | "
            f"{r.get('peak_memory_bytes', 0) / 2**20:.0f} |")
    lines += ["", "Speed-up over dense, measured / predicted (prefill by MACs per token, decode by "
              "bytes read per token, memory by parameter bytes):", "",
              "| model | prefill 512 | prefill 2048 | decode b1 | decode b8 | memory |",
              "|---|---|---|---|---|---|"]
    for r in timed:
        if r["model"] == "dense" or "macs_512" not in r:
            continue
        cells = []
        for key, pred in (("prefill_512", dense["macs_512"] / r["macs_512"]),
                          ("prefill_2048", dense["macs_2048"] / r["macs_2048"]),
                          ("decode_b1", dense["decode_bytes_b1"] / r["decode_bytes_b1"]),
                          ("decode_b8", dense["decode_bytes_b8"] / r["decode_bytes_b8"])):
            cells.append(f"{r[key] / dense[key]:.2f}× / {pred:.2f}×")
        mem = dense["peak_memory_bytes"] / max(1, r["peak_memory_bytes"])
        cells.append(f"{mem:.2f}× / {dense['parameters'] / r['parameters']:.2f}×")
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    lines += ["", "Perplexity of every method at each MLP width:", "",
              "| MLP removed | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for width in sorted({r["mlp_removed"] for r in rows if r["kind"] == "shrunk"}):
        by = {r["method"]: r["ppl"] for r in rows
              if r["kind"] == "shrunk" and r["mlp_removed"] == width}
        lines.append(f"| {width:.0%} | " + " | ".join(
            f"{by[m]:.1f}" if m in by else "-" for m in METHODS) + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["model"] == "dense")
    speed = {r["mlp_removed"]: r["prefill_2048"] / dense["prefill_2048"]
             for r in rows if r["kind"] == "shrunk" and "prefill_2048" in r}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    shown = [r["ppl"] for r in rows if r["kind"] == "shrunk" and r["method"] != "magnitude"]
    ceiling = 2 * max(shown) if shown else None
    for method in METHODS:
        points = sorted((speed[r["mlp_removed"]], r["ppl"], r["mlp_removed"]) for r in rows
                        if r["kind"] == "shrunk" and r["method"] == method
                        and r["mlp_removed"] in speed)
        if points and ceiling and min(p[1] for p in points) > ceiling:
            ax.plot([], [], " ", label=f"{method}: off the scale "
                    f"(ppl ≥ {min(p[1] for p in points):.2g})")
        elif points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
            if method == "thanos":
                for x, y, w in points:
                    ax.annotate(f"{w:.0%}", (x, y), textcoords="offset points", xytext=(4, -10),
                                fontsize=8)
    ax.axhline(dense["ppl"], color="gray", linestyle=":", label="dense")
    ax.set_yscale("log")
    if ceiling:
        ax.set_ylim(dense["ppl"] * 0.8, ceiling)
    ax.set_xlabel("measured prefill speed-up over dense (2,048 tokens)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("Shrunk MLP: quality vs speed (labels: neurons removed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
