"""The ``quantize`` step: every decoder-block linear layer on a scheme's grid by a registered
quantiser (GPTQ on the Hessian, or round-to-nearest), alone or fused into the pass of the
prune or shrink step before it (the same statistics and factor, pruned weights kept at 0)."""

from __future__ import annotations

import time
from pathlib import Path

from ..engine.mixes import FALLBACK, MIXES, fallback
from ..engine.quantizers import SCALES, get_quantizer, quantize_weight, quantizer_names
from ..engine.schemes import GGUF_SCHEMES, SCHEME_NAMES, parse_scheme
from ..errors import SnapPruneError
from ..flags import Command, Flag, default_text, number, positive_int
from ..models.layout import linear_weight
from ..models.quantize import check_quantizable, quantize_model
from ..models.records import mean_layer_error
from ..models.settings import QuantizeSettings
from ..models.slots import tensor_slots
from ..models.targets import target_layers
from .base import EstimatePart, Probe, Step, StepContext, earlier_changes
from .prune import first_block_layers

EPILOG = """\
GPTQ quantises each layer column by column on its Hessian (the calibration statistics pruning
uses) and spreads each rounding error over the columns still to come; round-to-nearest (--method
rtn) needs no data. With llama.cpp's block types each block's scale is searched to minimise the
error weighted by the Hessian diagonal (--scales search, the default of gptq and weighted-rtn;
--scales absmax: the format's formula). Schemes: llama.cpp's q4_0, q5_0, q8_0, iq4_nl, q4_1,
q5_1 (blocks of 32), the K-quants q2_k ... q6_k and iq4_xs (super-blocks of 256; rows that are
not multiples of 256 get llama.cpp's fallback type, stated in the report), llama.cpp's mixes
Q2_K, Q3_K_M, Q4_K_S, Q4_K_M, Q5_K_M, Q6_K, IQ4_XS, IQ4_NL (its per-tensor rules), and
w<bits>[g<group>][-asym] (compressed-tensors' grids; --format compressed-tensors writes 4 and 8
bits for vLLM). --target-size MB (or --target-bpw B) measures every tensor's error under every
llama.cpp type and chooses the types with the least total error that fill the GGUF file to that
size. hf writes de-quantised safetensors for any scheme.

examples:
  snapprune quantize --model smollm2-135m --scheme q4_0 --format gguf --out runs/q4_0
  snapprune quantize --model smollm2-135m --scheme Q4_K_M --format gguf --out runs/q4_k_m
  snapprune quantize --model smollm2-135m --target-size 80 --format gguf --out runs/80mb
  snapprune prune --model smollm2-135m --method thanos --quantize q4_0 --format gguf \\
      --out runs/thanos50-q4_0                          # joint: pruned weights stay 0
  snapprune shrink --model smollm2-135m --mlp 0.3 --heads 0.34 --quantize q4_0 \\
      --format gguf --out runs/smaller-q4_0              # smaller and 4-bit
"""

SCHEMES_HELP = (
    f"quantisation schemes: {', '.join(GGUF_SCHEMES)} (llama.cpp's block types, for --format "
    f"gguf), llama.cpp's mixes {', '.join(MIXES)} (per-tensor types by its rules), or "
    "w<bits>[g<group>][-asym] with bits 2, 3, 4, 8 (compressed-tensors' grids, for "
    "--format compressed-tensors when 4 or 8 bits): e.g. " + ", ".join(SCHEME_NAMES))
TARGET_HELP = ("fill the GGUF file to this size in MB (10^6 bytes): every tensor's output error "
               "measured under every llama.cpp type (one calibration pass), then the types with "
               "the least total error that fit (the token embedding / output matrix included)")
BPW_HELP = ("the same as --target-size, as bits per quantised weight (scales included)")
SCALES_HELP = ("how block scales are chosen: search (llama.cpp's block types, with calibration: "
               "each block's scale minimises the error weighted by the Hessian diagonal, then "
               "GPTQ or rounding on that grid) or absmax (the format's formula); default: the "
               "quantiser's own (gptq, weighted-rtn: search; rtn: absmax)")
EMBEDDING_HELP = ("the llama.cpp type of the token embedding and output matrix (llama-quantize's "
                  "--token-embedding-type and --output-tensor-type; one matrix when tied), "
                  "e.g. iq4_nl or q4_0: in a 4-bit file of a small model with a large vocabulary "
                  "it is a third of the bytes; default: q8_0 under a plain type, the mix's rule "
                  "under a mix")
ACT_ORDER_HELP = ("GPTQ in decreasing Hessian diagonal (group scales fitted up front, kept in "
                  "natural order)")


def _quantizer_help() -> str:
    return ("the quantiser: " + "; ".join(f"{n} ({get_quantizer(n).summary})"
                                         for n in quantizer_names())
            + default_text(QuantizeSettings, "method"))


class QuantizeStep(Step):
    name = "quantize"
    settings_type = QuantizeSettings
    order = 30
    label = "quantised"
    verb = "quantise"
    changes = frozenset({"grid"})
    single_process = ("quantisation runs in one process; prune or shrink under torchrun, then "
                      "quantise the output in one process")
    suggest_rank = 2
    command = Command(
        "quantize", help="quantise a model's weights (GPTQ or round-to-nearest) and write it "
                         "for llama.cpp, vLLM or transformers",
        description="Quantise every decoder-block linear layer, block by block.",
        epilog=EPILOG, what="quantising", first_group="quantisation",
        groups=("calibration", "layer_errors", "evaluation", "output"))
    flags = (
        Flag("scheme", ("--scheme",), SCHEMES_HELP, metavar="SCHEME"),
        Flag("method", ("--method",), _quantizer_help, choices=quantizer_names,
             show_default=False),
        Flag("blocksize", ("--blocksize",), "GPTQ's lazy block width", type=positive_int,
             metavar="B"),
        Flag("percdamp", ("--percdamp",), "Hessian damping, fraction of its mean diagonal",
             type=number, metavar="F"),
        Flag("include", ("--include",), "only layers whose name matches; repeatable",
             action="append", metavar="PAT", show_default=False),
        Flag("exclude", ("--exclude",), "skip layers whose name matches; repeatable",
             action="append", metavar="PAT", show_default=False),
        Flag("act_order", ("--act-order",), ACT_ORDER_HELP, action="store_true",
             show_default=False),
        Flag("scales", ("--scales",), SCALES_HELP, choices=lambda: SCALES, show_default=False),
        Flag("target_size", ("--target-size",), TARGET_HELP, type=number, metavar="MB",
             show_default=False),
        Flag("target_bpw", ("--target-bpw",), BPW_HELP, type=number, metavar="B",
             show_default=False),
        Flag("embedding_type", ("--embedding-type",), EMBEDDING_HELP, metavar="TYPE",
             show_default=False),
    )
    fused_flags = (
        Flag("scheme", ("--quantize",), "also quantise every pruned layer, in the same pass, "
             "on the same Hessian (pruned weights stay exactly 0). " + SCHEMES_HELP,
             metavar="SCHEME", show_default=False, group="quantisation"),
        Flag("method", ("--quant-method",), _quantizer_help, choices=quantizer_names,
             show_default=False, group="quantisation"),
        Flag("blocksize", ("--quant-blocksize",), "GPTQ's lazy block width",
             type=positive_int, metavar="B", group="quantisation"),
        Flag("act_order", ("--act-order",), ACT_ORDER_HELP, action="store_true",
             show_default=False, group="quantisation"),
        Flag("scales", ("--quant-scales",), SCALES_HELP, choices=lambda: SCALES,
             show_default=False, group="quantisation"),
        Flag("embedding_type", ("--embedding-type",), EMBEDDING_HELP, metavar="TYPE",
             show_default=False, group="quantisation"),
    )
    fused_trigger = "scheme"
    """The fused flag without which the others mean nothing (``--quantize SCHEME``)."""

    def check(self, settings: QuantizeSettings, job) -> None:
        settings.check()
        earlier = earlier_changes(job, self.name)
        if "zeros" in earlier and not all(parse_scheme(t).exact_zero
                                          for t in _types_of(settings)):
            raise SnapPruneError(f"{settings.scheme}'s grid has no exact zero, so pruned "
                                 "weights would not stay 0; use q4_0, q8_0, q3_k, q6_k or a "
                                 "w* scheme")
        fmt = job.output.format if job.output is not None else None
        what = ("a size target" if settings.sized else
                f"llama.cpp's mix {settings.parsed_mix.name}" if settings.parsed_mix else None)
        if what and fmt == "compressed-tensors":
            raise SnapPruneError(f"{what} chooses llama.cpp's types, which only GGUF holds; "
                                 "write --format gguf (or hf, de-quantised)")
        if settings.sized and earlier:
            raise SnapPruneError("a size target measures the model as it is: prune or shrink "
                                 "first, then quantise that output with --target-size")

    def check_model(self, settings: QuantizeSettings, job, model) -> None:
        # After a step that cuts layers smaller, that step checks the cut widths itself.
        if "shapes" not in earlier_changes(job, self.name):
            layers = target_layers(model, settings.include, settings.exclude)
            check_quantizable(model, layers, settings)
            if settings.sized:
                from ..models.allocation import budget_bytes

                budget_bytes(model, tensor_slots(model, layers), settings,
                             metadata_bytes(job))

    def estimate_layers(self, settings: QuantizeSettings, model) -> dict[str, float | None]:
        return dict.fromkeys(first_block_layers(model, settings.include, settings.exclude))

    def estimate(self, settings: QuantizeSettings, probe: Probe) -> EstimatePart:
        solve = 0.0
        for name in self.estimate_layers(settings, probe.model):
            t = time.perf_counter()
            weight = linear_weight(probe.layers[name])
            scheme = settings.parsed_scheme
            if scheme.gguf:  # the type the layer will have (llama.cpp's fallback included)
                scheme = fallback(scheme.name, weight.shape[1], "").scheme
            quantize_weight(weight, probe.stats and probe.stats.get(name), scheme,
                            method=settings.method, act_order=settings.act_order,
                            blocksize=settings.blocksize, percdamp=settings.percdamp,
                            error=False, scales=settings.scales)
            solve += time.perf_counter() - t
        return EstimatePart(solver_seconds=solve)

    def apply(self, settings: QuantizeSettings, context: StepContext, fused=None):
        bench, job = context.bench, context.job
        block_pass = bench.block_pass(job, calibrated=settings.needs_calibration,
                                      verbose=context.verbose)
        run = quantize_model(bench.model, None, settings,
                             layer_errors=job.execution.layer_errors,
                             metadata=metadata_bytes(job) if settings.sized else 0,
                             **block_pass.options)
        return block_pass.account(run)

    def log_line(self, run, *, fused: bool = False) -> str:
        where = " in the same pass" if fused else f" in {run.total_seconds:.1f}s"
        return (f"quantised {len(run.layers)} layers ({run.settings.method} "
                f"{run.settings.scheme}){where}")

    def summary(self, run) -> str:
        scheme = run.scheme
        mean = mean_layer_error(run.layers)
        error = f"; mean layer error {mean:.4f}" if mean is not None else ""
        counts = _type_counts(run)
        if len(counts) > 1 or run.settings.parsed_mix or run.settings.sized:
            what = (f"size target {_target_text(run.settings)}" if run.settings.sized else
                    run.settings.parsed_mix.name if run.settings.parsed_mix else scheme.name)
            types = ", ".join(f"{n} {t}" for t, n in counts.items())
            return (f"{run.settings.method} {what} ({types}; {run.settings.scales} scales) on "
                    f"{len(run.layers)} tensors{error}")
        return (f"{run.settings.method} {scheme.name} ({scheme.bits_per_weight:g} bits per "
                f"weight, {run.settings.scales} scales) on {len(run.layers)} layers{error}")

    def report(self, run) -> dict:
        """The quantisation section: the scheme's facts, the settings, and per-layer errors
        (against the weights the quantiser was given: after pruning, when joint)."""
        from dataclasses import asdict

        scheme = run.scheme
        return {"quantization": {
            "scheme": scheme.name, "bits": scheme.bits, "group_size": scheme.group_size,
            "symmetric": scheme.symmetric, "grid": scheme.grid,
            "bits_per_weight": scheme.bits_per_weight, "scale_dtype": run.scale_dtype,
            "settings": asdict(run.settings),
            "mean_layer_error": mean_layer_error(run.layers),
            "seconds": run.solver_seconds,
            "types": _type_counts(run),
            "bits_per_weight_mean": _mean_bits(run),
            "layers": [{"name": r.name, "shape": r.shape, "error": r.error,
                        "seconds": r.seconds, **_type_of(run, r.name)}
                       for r in run.layers]}}

    def next_step(self, job, where) -> str | None:
        if self.name in job.kinds:
            return None
        return (f"  snapprune quantize --model {where} --scheme q4_0 --format gguf --out "
                f"{where}-q4_0      # 4-bit, for llama.cpp")



def _types_of(settings: QuantizeSettings) -> set[str]:
    """Every type a scheme or mix may give a tensor (fallbacks included)."""
    mix = settings.parsed_mix
    types = {settings.parsed_scheme.name}
    if mix is not None:
        types |= {mix.base, "q8_0", "q6_k"} | {rule.scheme for rule in mix.rules}
    if settings.sized:
        from ..engine.mixes import CANDIDATES

        types |= set(CANDIDATES)
    return types | {FALLBACK[t] for t in types if t in FALLBACK}


def metadata_bytes(job) -> int:
    """The GGUF file's bytes besides its tensors: as the source GGUF file holds them (the
    tokenizer is carried over), else about the size of the tokenizer's ``tokenizer.json``
    (its tokens and merges, which the file holds as strings) and each tensor's entry."""
    from ..export.gguf import source_gguf
    from ..models.loading import resolve_model

    source = source_gguf(job.model)
    if source is not None:
        from ..models.gguf_check import check_gguf

        return check_gguf(source).data_offset
    try:
        where = Path(resolve_model(job.model).path)
    except SnapPruneError:
        return 0
    files = list(where.glob("tokenizer.json")) + list(where.glob("tokenizer.model"))
    return sum(f.stat().st_size for f in files) + TENSOR_ENTRY_BYTES * _tensor_count(where)


TENSOR_ENTRY_BYTES = 128
"""A tensor's entry in a GGUF header (name, shape, type, offset) and its alignment, at most."""


def _tensor_count(where: Path) -> int:
    import json

    config = where / "config.json"
    if not config.is_file():
        return 0
    layers = json.loads(config.read_text(encoding="utf-8")).get("num_hidden_layers", 0)
    return 12 * int(layers or 0) + 3


def _type_counts(run) -> dict[str, int]:
    counts: dict[str, int] = {}
    for q in run.quantized.values():
        counts[q.scheme.name] = counts.get(q.scheme.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _mean_bits(run) -> float | None:
    total = bits = 0
    for q in run.quantized.values():
        n = q.codes.numel()
        total, bits = total + n, bits + n * q.scheme.bits_per_weight
    return bits / total if total else None


def _type_of(run, name: str) -> dict:
    q = run.quantized.get(name)
    return {} if q is None else {"type": q.scheme.name, "why": q.why}


def _target_text(settings: QuantizeSettings) -> str:
    if settings.target_size is not None:
        return f"{settings.target_size:g} MB"
    return f"{settings.target_bpw:g} bits per weight"
