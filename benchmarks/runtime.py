"""GGUF files in llama.cpp itself (llama-cpp-python): size, prefill and decode speed, and
perplexity, beside this machine's memory bandwidth.

    python benchmarks/runtime.py --quant runs/quant --out docs/measurements/runtime
        [--threads 2] [--rounds 3] [--windows 40]

Models: the shipped SmolLM2 Q4_1 file; dense float16 written by snapprune; llama.cpp's own
``q4_0`` of it (``llama_model_quantize``, llama.cpp's round-to-nearest); every GGUF file the
quantisation table (``benchmarks/quantize_table.py``) wrote; the shrunk model in float16 and
llama.cpp's own ``q4_0`` of it.

- Speed: a 512-token prompt's prefill and 128 greedy decode tokens, ``--threads`` threads,
  ``--rounds`` rounds with the models timed in turn; the best round and the median.
- Perplexity in llama.cpp: the same WikiText-2 token ids and windows snapprune's evaluation
  uses (its tokenizer, ``--windows`` × 1,024 tokens), each window from a fresh context, from
  llama.cpp's logits. Beside it, llama.cpp's perplexity with its own tokenizer.
- Bytes read per decoded token: every tensor once (the token embedding is the tied output
  matrix, read whole for the logits). Decode tokens/s × bytes per token against the measured
  bandwidth says how close decoding runs to the memory limit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from snapprune.eval.llama import llama_cpp_perplexity

SEQLEN = 1024


def bandwidth(seconds: float = 3.0) -> dict:
    """Read bandwidth (a 1 GiB float32 sum) and copy bandwidth (1 GiB to 1 GiB), best of a
    few rounds, with torch on this process's threads."""
    data = torch.ones(2**28)
    target = torch.empty_like(data)
    reads, copies = [], []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(reads) < 3:
        t = time.perf_counter()
        data.sum()
        reads.append(data.nbytes / (time.perf_counter() - t))
        t = time.perf_counter()
        target.copy_(data)
        copies.append(2 * data.nbytes / (time.perf_counter() - t))
    return {"read_gb_s": max(reads) / 1e9, "copy_gb_s": max(copies) / 1e9,
            "threads": torch.get_num_threads()}


def tensor_bytes(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


def llama_quantize(source: Path, target: Path, threads: int) -> Path:
    """llama.cpp's own q4_0 of a float16 GGUF file."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = threads
    target.parent.mkdir(parents=True, exist_ok=True)
    code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if code != 0:
        raise SystemExit(f"llama_model_quantize failed ({code}) on {source}")
    return target


def open_model(path: Path, threads: int, *, logits_all: bool):
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=SEQLEN, n_batch=512, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, verbose=False)


def greedy(llm) -> int:
    """The next token from the last evaluated position's logits. Without ``logits_all``
    llama-cpp-python keeps no scores (its ``scores`` array is left unwritten), so they are read
    from the context itself."""
    import llama_cpp

    pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(pointer, shape=(llm.n_vocab(),))))


def speed_round(path: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    llm = open_model(path, threads, logits_all=False)
    try:
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t
        token = greedy(llm)
        t = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = greedy(llm)
        decode = time.perf_counter() - t
    finally:
        llm.close()
    return {"prefill_tok_s": len(prompt) / prefill, "decode_tok_s": new_tokens / decode}


def models(quant: Path, work: Path, threads: int) -> dict[str, Path]:
    """Every file to measure, by name (llama.cpp's own q4_0 files made on the way)."""
    from snapprune.jobs import EvaluationSpec, Job, OutputSpec
    from snapprune.models.loading import smollm2_path
    from snapprune.run import execute

    found = {"shipped Q4_1": smollm2_path()}
    dense = work / "dense-f16"
    if not (dense / "model.gguf").is_file():
        execute(Job(model="smollm2-135m", evaluation=EvaluationSpec(ppl=()),
                    output=OutputSpec(format="gguf", samples=False)), dense, overwrite=True,
                progress=False)
    found["dense f16"] = dense / "model.gguf"
    found["dense, llama.cpp q4_0"] = llama_quantize(dense / "model.gguf",
                                                    work / "dense-llama-q4_0.gguf", threads)
    files = quant / "files"
    for directory in sorted(files.iterdir()) if files.is_dir() else []:
        if (directory / "model.gguf").is_file() and "-s" not in directory.name[-3:]:
            found[directory.name] = directory / "model.gguf"
    if "shrink" in found:
        found["shrink, llama.cpp q4_0"] = llama_quantize(found["shrink"],
                                                         work / "shrink-llama-q4_0.gguf",
                                                         threads)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant", type=Path, default=Path("runs/quant"))
    parser.add_argument("--out", type=Path, default=Path("runs/runtime"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-own-tokens", action="store_true",
                        help="skip the perplexity with llama.cpp's own tokenizer (halves the "
                             "perplexity time)")
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--render", action="store_true",
                        help="only the table and PNG from OUT/runtime.json")
    args = parser.parse_args()
    if args.render:
        print(render(args.out / "runtime.json", args.quant / "cells.jsonl",
                     args.out / "ppl_vs_size_and_speed.png"))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from snapprune.data import evaluation_ids, read_documents, sample_path, wikitext_join
    from snapprune.models.loading import smollm2_path

    gguf = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ids = evaluation_ids("wikitext2-test", tokenizer)
    windows = [ids[i * SEQLEN : (i + 1) * SEQLEN].tolist() for i in range(args.windows)]
    found = models(args.quant, args.out / "files", args.threads)
    if args.only:
        found = {k: v for k, v in found.items() if k in args.only}
    rows = {name: {"model": name, "file": str(path), "file_bytes": path.stat().st_size,
                   "tensor_bytes": tensor_bytes(path)} for name, path in found.items()}
    print(f"{len(rows)} models: {', '.join(rows)}", flush=True)
    rows_bw = bandwidth()
    print(json.dumps(rows_bw), flush=True)
    prompt = ids[: 512].tolist()
    rounds: dict[str, list[dict]] = {name: [] for name in rows}
    for number in range(args.rounds):
        for name, path in found.items():
            rounds[name].append(speed_round(path, prompt, args.new_tokens, args.threads))
        print(f"speed round {number + 1}/{args.rounds} done", flush=True)
    for name, samples in rounds.items():
        for key in ("prefill_tok_s", "decode_tok_s"):
            values = [s[key] for s in samples]
            rows[name][f"{key}_best"] = max(values)
            rows[name][f"{key}_median"] = statistics.median(values)
        rows[name]["decode_gb_s"] = rows[name]["decode_tok_s_best"] * \
            rows[name]["tensor_bytes"] / 1e9
    text = wikitext_join(read_documents(sample_path("wikitext-2-test.raw.gz"))[0])
    for name, path in found.items():
        t = time.perf_counter()
        row = rows[name]
        row["llama_ppl_snapprune_tokens"] = llama_cpp_perplexity(path, windows,
                                                                 threads=args.threads)
        if not args.no_own_tokens:
            llm = open_model(path, args.threads, logits_all=False)
            own = llm.tokenize(text.encode(), add_bos=False, special=False)
            llm.close()
            own_windows = [own[i * SEQLEN : (i + 1) * SEQLEN] for i in range(args.windows)]
            row["llama_ppl_own_tokens"] = llama_cpp_perplexity(path, own_windows,
                                                               threads=args.threads)
        rows[name]["ppl_seconds"] = time.perf_counter() - t
        print(json.dumps(rows[name]), flush=True)
    result = {"bandwidth": rows_bw, "threads": args.threads, "rounds": args.rounds,
              "windows": args.windows, "seqlen": SEQLEN, "new_tokens": args.new_tokens,
              "rows": list(rows.values())}
    (args.out / "runtime.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0



LABELS = {
    "shipped Q4_1": ("SmolLM2 as shipped (Q4_1 file)", "q4_1 (its own)"),
    "dense f16": ("dense", "float16"),
    "dense, llama.cpp q4_0": ("dense, llama.cpp's own q4_0", "q4_0, llama.cpp RTN"),
    "rtn-q4_0": ("dense, RTN q4_0 (snapprune)", "q4_0"),
    "gptq-q4_0": ("dense, GPTQ q4_0", "q4_0"),
    "rtn-q8_0": ("dense, RTN q8_0", "q8_0"),
    "gptq-q8_0": ("dense, GPTQ q8_0", "q8_0"),
    "thanos50-rtn-q4_0": ("Thanos 50%, then RTN q4_0", "q4_0"),
    "thanos50-gptq-q4_0": ("Thanos 50% + GPTQ q4_0 (joint)", "q4_0"),
    "thanos24-gptq-q4_0": ("Thanos 2:4 + GPTQ q4_0 (joint)", "q4_0"),
    "shrink": ("shrink MLP 30% + heads 9→6", "float16"),
    "shrink, llama.cpp q4_0": ("shrink, llama.cpp's own q4_0", "q4_0, llama.cpp RTN"),
    "shrink-rtn-q4_0": ("shrink, then RTN q4_0 (snapprune)", "q4_0"),
    "shrink-gptq-q4_0": ("shrink + GPTQ q4_0 (joint)", "q4_0"),
}


def render(runtime: Path, quant_cells: Path, out: Path) -> str:
    """The Markdown table and the PNG (perplexity against file size and decode speed)."""
    data = json.loads(runtime.read_text())
    ours = {}
    if quant_cells.is_file():
        for line in quant_cells.read_text().splitlines():
            record = json.loads(line)
            if record["seed"] == 0:
                ours[record["name"]] = record["perplexity"]
    dense = next(r for r in data["rows"] if r["model"] == "dense, llama.cpp q4_0")
    lines = [f"| model | grid | file MB | WikiText-2 ppl in llama.cpp ({data['windows']} "
             "windows) | WikiText-2, snapprune (table above) | C4 tail, snapprune | decode tok/s "
             "(× dense q4_0) | prefill 512 tok/s (×) | decode × bytes read, GB/s |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for row in data["rows"]:
        label, grid = LABELS.get(row["model"], (row["model"], ""))
        mine = ours.get(row["model"] if row["model"] != "dense f16" else "dense", {})
        wiki = f"{mine['wikitext2-test']:.2f}" if "wikitext2-test" in mine else "–"
        c4 = f"{mine['c4-sample-eval']:.2f}" if "c4-sample-eval" in mine else "–"
        ratio = row["decode_tok_s_best"] / dense["decode_tok_s_best"]
        prefill = row["prefill_tok_s_best"] / dense["prefill_tok_s_best"]
        lines.append(f"| {label} | {grid} | {row['file_bytes'] / 1e6:.1f} | "
                     f"{row['llama_ppl_snapprune_tokens']:.2f} | {wiki} | {c4} | "
                     f"{row['decode_tok_s_best']:.1f} ({ratio:.2f}×) | "
                     f"{row['prefill_tok_s_best']:.0f} ({prefill:.2f}×) | "
                     f"{row['decode_gb_s']:.1f} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "\n".join(lines)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
    for row in data["rows"]:
        label = LABELS.get(row["model"], (row["model"],))[0]
        ppl = row["llama_ppl_snapprune_tokens"]
        for axis, x in zip(axes, (row["file_bytes"] / 1e6, row["decode_tok_s_best"]),
                           strict=True):
            axis.scatter(x, ppl, s=18)
            axis.annotate(label, (x, ppl), fontsize=6, xytext=(3, 2), textcoords="offset points")
    axes[0].set_xlabel("GGUF file (MB)")
    axes[1].set_xlabel(f"llama.cpp decode tokens/s ({data['threads']} threads)")
    axes[0].set_ylabel("WikiText-2 perplexity in llama.cpp")
    axes[0].set_yscale("log")
    fig.suptitle("SmolLM2-135M in llama.cpp: quality against size and speed")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
