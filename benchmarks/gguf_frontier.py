"""snapprune's GGUF files against llama.cpp's own quantiser, measured by llama.cpp itself.

For one model: llama.cpp's tools (``llama_tools.py``: built once, cached) make the f16 file,
the importance matrix (``llama-imatrix``, on the same calibration windows snapprune uses) and
their quantisations with and without it (``llama-quantize``); snapprune quantises the same
model on the same windows (GPTQ on searched scales, and its ablations). Every file is then
measured by ``llama-perplexity`` on two texts that calibration never saw (WikiText-2 test and
the held-out tail of the C4 validation file): perplexity, and the KL divergence of its
next-token distributions from the f16 file's (``--kl-divergence``). Each tool's time is kept.

    python benchmarks/gguf_frontier.py --out runs/frontier               # q4_0 and iq4_nl
    python benchmarks/gguf_frontier.py --out runs/frontier --types Q4_K_M Q3_K_M \
        --variants gptq --target 0.9                                     # mixes, size target
    python benchmarks/gguf_frontier.py --out runs/frontier --seeds 0 1 2 # calibration seeds
    python benchmarks/gguf_frontier.py --out runs/frontier --bench 5     # + llama-bench speed

``--target F``: snapprune's ``--target-size`` at ``F`` times the size of llama.cpp's
``Q4_0 --imatrix`` file (``0.9``: below anything llama.cpp's mixes reach for SmolLM2).

Writes ``results.json``, ``table.md`` and ``frontier.png`` (perplexity and KLD against file size,
both tools' points) into ``--out``; finished measurements are reused on a rerun.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from llama_tools import bench, build_seconds, tools

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
C4_FILE = SHARED / "c4" / "c4-validation-2k-part1.json.gz"
WIKITEXT = SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"
HELDOUT_DOCS = 500
CALIBRATION = (32, 512)
"""Windows × tokens, for both tools."""
EVAL_CHUNKS, EVAL_CTX = 24, 512
LLAMA_TYPES = {"q4_0": "Q4_0", "iq4_nl": "IQ4_NL", "Q4_K_M": "Q4_K_M", "Q3_K_M": "Q3_K_M",
               "IQ4_XS": "IQ4_XS", "Q4_K_S": "Q4_K_S", "Q5_K_M": "Q5_K_M"}
"""snapprune's scheme (a block type or a mix of the same name) → llama-quantize's type."""
SNAPPRUNE_VARIANTS = {
    "gptq": ("--method", "gptq"),            # searched scales, GPTQ, refit (the default)
    "gptq-act-order": ("--method", "gptq", "--act-order"),
    "gptq-absmax": ("--method", "gptq", "--scales", "absmax"),
    "weighted-rtn": ("--method", "weighted-rtn"),
}


def _run(command: list[str], log: Path) -> float:
    """Run ``command`` with its output in ``log``; its wall time in seconds."""
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{command[0]} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def _texts(out: Path) -> dict[str, Path]:
    """The calibration documents and the
    two evaluation texts."""

    with gzip.open(C4_FILE, "rt", encoding="utf-8") as handle:
        docs = [json.loads(line)["text"] for line in handle]
    calibration, heldout = docs[:-HELDOUT_DOCS], docs[-HELDOUT_DOCS:]
    paths = {"calib_docs": out / "c4_calibration_docs.jsonl", "c4": out / "c4_heldout.txt",
             "wikitext": out / "wikitext2_test.txt"}
    paths["calib_docs"].write_text("".join(json.dumps({"text": d}) + "\n" for d in calibration),
                                   encoding="utf-8")
    paths["c4"].write_text("\n\n".join(heldout), encoding="utf-8")
    lines = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n").split("\n")
    paths["wikitext"].write_text("\n\n".join(lines), encoding="utf-8")
    return paths


def _imatrix_text(out: Path, tokenizer, docs: Path, seed: int) -> Path:
    from snapprune.data import calibration_windows

    windows = calibration_windows(str(docs), tokenizer, nsamples=CALIBRATION[0],
                                  seqlen=CALIBRATION[1], seed=seed)
    path = out / f"imatrix_text_seed{seed}.txt"
    path.write_text("".join(tokenizer.decode(w) for w in windows), encoding="utf-8")
    return path


_PPL = re.compile(r"Mean PPL\(Q\)\s*:\s*([\d.]+)\s*±\s*([\d.]+)")
_KLD = re.compile(r"Mean\s+KLD:\s*([\d.]+)\s*±\s*([\d.]+)")
_FINAL = re.compile(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)")


def _measure(bin_: dict, model: Path, base: Path, log: Path) -> dict:
    """Perplexity and KLD of ``model`` against the f16 logits stored in ``base``."""
    seconds = _run([str(bin_["llama-perplexity"]), "-m", str(model), "--kl-divergence-base",
                    str(base), "--kl-divergence", "-t", "2", "-c", str(EVAL_CTX)], log)
    text = log.read_text(encoding="utf-8", errors="replace")
    ppl, kld = _PPL.search(text), _KLD.search(text)
    if ppl is None or kld is None:
        raise SystemExit(f"no perplexity/KLD in {log}")
    return {"ppl": float(ppl[1]), "ppl_err": float(ppl[2]), "kld": float(kld[1]),
            "kld_err": float(kld[2]), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--types", nargs="+", default=list(LLAMA_TYPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", default=list(SNAPPRUNE_VARIANTS))
    parser.add_argument("--target", nargs="*", type=float, default=[],
                        help="snapprune --target-size at these fractions of llama.cpp's "
                             "Q4_0 --imatrix file")
    parser.add_argument("--bench", type=int, default=0, metavar="ROUNDS",
                        help="then prefill and decode speed by llama-bench: the f16 file and "
                             "the first seed's files of these types, interleaved, ROUNDS rounds")
    args = parser.parse_args()

    from snapprune.models.loading import load_tokenizer, resolve_model

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results.setdefault("files", {})

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))

    bin_ = tools()
    results["llama_tools_build_seconds"] = build_seconds()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source.path, gguf_file=source.gguf_file)
    texts = _texts(out)

    f16 = out / "f16.gguf"
    if not f16.is_file() and source.gguf_file:
        results["f16_seconds"] = _run([str(bin_["llama-quantize"]), "--allow-requantize",
                                       str(Path(source.path) / source.gguf_file), str(f16),
                                       "F16"], out / "f16.log")
    elif not f16.is_file():  # a Hugging Face directory (a shrunk model): snapprune's writer
        from snapprune.jobs import EvaluationSpec, Job, OutputSpec
        from snapprune.run import execute

        start = time.perf_counter()
        execute(Job(model=args.model, steps=(), evaluation=EvaluationSpec(ppl=(), dense=False),
                    output=OutputSpec(format="gguf", samples=False)), out / "f16-dir",
                progress=False, announce=False)
        (out / "f16-dir" / "model.gguf").rename(f16)
        results["f16_seconds"] = time.perf_counter() - start
    bases = {}
    for name in ("wikitext", "c4"):
        bases[name] = out / f"{name}.kld-base"
        if not bases[name].is_file():
            _run([str(bin_["llama-perplexity"]), "-m", str(f16), "-f", str(texts[name]),
                  "--kl-divergence-base", str(bases[name]), "--chunks", str(EVAL_CHUNKS),
                  "-c", str(EVAL_CTX), "-t", "2"], out / f"{name}.base.log")

    def record(key: str, path: Path, made_in: float | None, tool: str) -> None:
        entry = results["files"].setdefault(key, {"tool": tool})
        entry["mb"] = path.stat().st_size / 1e6
        if made_in is not None:
            entry["seconds_to_make"] = made_in
        for name, base in bases.items():
            if name not in entry:
                entry[name] = _measure(bin_, path, base, out / f"{key}.{name}.log")
                save()
        print(f"{key}: {entry['mb']:.1f} MB, " + ", ".join(
            f"{n} ppl {entry[n]['ppl']:.2f} kld {entry[n]['kld']:.4f}" for n in bases),
            flush=True)

    benched: dict[str, Path] = {"f16": f16}
    for seed in args.seeds:
        imatrix = out / f"imatrix_seed{seed}.gguf"
        made = None
        if not imatrix.is_file():
            text = _imatrix_text(out, tokenizer, texts["calib_docs"], seed)
            made = _run([str(bin_["llama-imatrix"]), "-m", str(f16), "-f", str(text), "-o",
                         str(imatrix), "-c", str(CALIBRATION[1]), "--chunks",
                         str(CALIBRATION[0]), "-t", "2"], out / f"imatrix_seed{seed}.log")
            results[f"imatrix_seed{seed}_seconds"] = made
        for scheme in args.types:
            kind = LLAMA_TYPES[scheme]
            plain = out / f"llama-{scheme}.gguf"
            if seed == args.seeds[0] and f"llama {kind}" not in results["files"]:
                made = _run([str(bin_["llama-quantize"]), str(f16), str(plain), kind, "2"],
                            out / f"llama-{scheme}.log")
                record(f"llama {kind}", plain, made, "llama.cpp")
            if seed == args.seeds[0]:
                benched[f"llama {kind}"] = plain
            weighted = out / f"llama-{scheme}-imatrix-seed{seed}.gguf"
            key = f"llama {kind} --imatrix seed {seed}"
            if seed == args.seeds[0]:
                benched[key] = weighted
            if key not in results["files"]:
                made = _run([str(bin_["llama-quantize"]), "--imatrix", str(imatrix), str(f16),
                             str(weighted), kind, "2"], out / f"{key.replace(' ', '_')}.log")
                record(key, weighted, made, "llama.cpp")
            for variant in args.variants:
                key = f"snapprune {scheme} {variant} seed {seed}"
                target = out / f"snapprune-{scheme}-{variant}-seed{seed}"
                if seed == args.seeds[0]:
                    benched[key] = target / "model.gguf"
                if key in results["files"]:
                    continue
                made = _run(["snapprune", "quantize", "--model", args.model, "--scheme", scheme,
                             *SNAPPRUNE_VARIANTS[variant], "--calib", str(texts["calib_docs"]),
                             "--nsamples", str(CALIBRATION[0]), "--seqlen",
                             str(CALIBRATION[1]), "--seed", str(seed), "--format", "gguf",
                             "--no-eval", "--no-samples", "--quiet", "--no-layer-errors",
                             "--overwrite", "--out", str(target)],
                            out / f"{key.replace(' ', '_')}.log")
                record(key, target / "model.gguf", made, "snapprune")
        for fraction in args.target:
            reference = results["files"].get(f"llama Q4_0 --imatrix seed {seed}")
            if reference is None:
                raise SystemExit("--target needs llama.cpp's Q4_0 --imatrix file: add q4_0 to "
                                 "--types")
            size = round(reference["mb"] * fraction, 2)
            key = f"snapprune --target-size {size} ({fraction:g}x Q4_0) seed {seed}"
            target = out / f"snapprune-target-{fraction:g}-seed{seed}"
            if seed == args.seeds[0]:
                benched[key] = target / "model.gguf"
            if key in results["files"]:
                continue
            made = _run(["snapprune", "quantize", "--model", args.model, "--target-size",
                         str(size), "--calib", str(texts["calib_docs"]), "--nsamples",
                         str(CALIBRATION[0]), "--seqlen", str(CALIBRATION[1]), "--seed",
                         str(seed), "--format", "gguf", "--no-eval", "--no-samples", "--quiet",
                         "--no-layer-errors", "--overwrite", "--out", str(target)],
                        out / f"snapprune-target-{fraction:g}-seed{seed}.log")
            record(key, target / "model.gguf", made, "snapprune")
    if args.bench:
        present = {k: v for k, v in benched.items() if v.is_file()}
        results.setdefault("speed", {}).update(
            bench(bin_, present, args.bench, out / "bench.log"))
    save()
    _table(results, out)
    _plot(results, out)


def _table(results: dict, out: Path) -> None:
    speed = results.get("speed", {})
    rows = ["| file | MB | WikiText-2 ppl | C4 tail ppl | KLD WikiText-2 | KLD C4 | s to make | "
            "prefill tok/s | decode tok/s |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for key, e in sorted(results["files"].items(), key=lambda kv: kv[1]["mb"]):
        s = speed.get(key)
        rate = (f"{s['prefill']['mean']:.0f} ± {s['prefill']['sd']:.0f} | "
                f"{s['decode']['mean']:.1f} ± {s['decode']['sd']:.1f}") if s else "– | –"
        rows.append(f"| {key} | {e['mb']:.1f} | {e['wikitext']['ppl']:.2f} | "
                    f"{e['c4']['ppl']:.2f} | {e['wikitext']['kld']:.4f} | "
                    f"{e['c4']['kld']:.4f} | {e.get('seconds_to_make', float('nan')):.0f} | "
                    f"{rate} |")
    if "f16" in speed:
        f16 = speed["f16"]
        rows.append(f"\nf16: prefill {f16['prefill']['mean']:.0f} ± {f16['prefill']['sd']:.0f}"
                    f", decode {f16['decode']['mean']:.1f} ± {f16['decode']['sd']:.1f} tok/s")
    (out / "table.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


def _plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "ppl", "perplexity"), (axes[1], "kld", "KL divergence")):
        for tool, marker in (("llama.cpp", "o"), ("snapprune", "s")):
            points = [(e["mb"], (e["wikitext"][metric] + e["c4"][metric]) / 2, k)
                      for k, e in results["files"].items() if e["tool"] == tool]
            if points:
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker,
                           label=tool)
                for x, y, k in points:
                    ax.annotate(k.replace(" seed 0", "").replace("snapprune ", "")
                                .replace("llama ", ""), (x, y), fontsize=6)
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel(f"{label}, mean of WikiText-2 and C4 tail")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=130)


if __name__ == "__main__":
    main()
