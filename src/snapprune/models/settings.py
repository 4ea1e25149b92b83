"""What a step changes, as immutable settings: zeros in place (``PruneSettings``) or whole
units cut out (``ShrinkSettings``). Each field's default is the one default of that setting:
the command line, recipes, sweeps and the Python API all read it from here."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import ClassVar

from ..engine import METRICS, check_settings, get_method
from ..engine.mixes import Mix, parse_mix
from ..engine.owl import owl_sparsities
from ..engine.quantizers import get_quantizer, scales_for
from ..engine.schemes import Scheme, parse_scheme
from ..errors import SnapPruneError


class MethodChoice:
    """What settings that name a method (``method``, ``metric``) derive from its declaration."""

    method: str
    metric: str | None

    @property
    def resolved_metric(self) -> str:
        return self.metric or get_method(self.method).default_metric

    @property
    def needs_calibration(self) -> bool:
        """Whether any calibration data enters the result (magnitude scores need none)."""
        return get_method(self.method).needs_activations(self.resolved_metric)


def check_percdamp(percdamp: float) -> None:
    if not (isinstance(percdamp, (int, float)) and math.isfinite(percdamp) and percdamp >= 0):
        raise SnapPruneError(f"percdamp (Hessian damping, a fraction of its mean diagonal) "
                             f"must be a finite number >= 0, got {percdamp!r}; 0.01 is usual")


PRUNE_ALLOCATIONS = ("uniform", "owl")


@dataclass(frozen=True)
class PruneSettings(MethodChoice):
    """Everything that decides the pruned weights (besides the model and calibration data).
    Immutable: ``dataclasses.replace`` makes a changed copy. ``sparsity`` ``None`` means the
    pattern's own (N:M) or 0.5 (the field's standard setting) for the other patterns."""

    method: str = "thanos"
    pattern: str = "unstructured"
    sparsity: float | None = None
    alpha: float = 0.0
    blocksize: int = 128
    percdamp: float = 0.01
    metric: str | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allocation: str = "uniform"
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0

    kind: ClassVar[str] = "prune"
    DEFAULT_SPARSITY: ClassVar[float] = 0.5

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))

    @property
    def resolved_sparsity(self) -> float:
        """The sparsity the run aims at: N/M for N:M, else the request or 0.5."""
        if ":" in str(self.pattern):
            return check_settings(self.method, self.pattern, self.sparsity, self.alpha,
                                  self.blocksize, self.metric)[1]
        return self.DEFAULT_SPARSITY if self.sparsity is None else self.sparsity

    def resolved(self) -> PruneSettings:
        """A copy naming every value the run uses (sparsity, metric), for records."""
        _, target = self.check()
        return replace(self, sparsity=target, metric=self.resolved_metric)

    @property
    def needs_calibration(self) -> bool:
        """OWL reads the activations' norms, whatever the method."""
        return self.allocation == "owl" or super().needs_calibration

    def check(self):
        """Refuse a bad request before any work; return ``(pattern, target sparsity)``."""
        check_percdamp(self.percdamp)
        sparsity = self.sparsity
        if sparsity is None and ":" not in str(self.pattern):
            sparsity = self.DEFAULT_SPARSITY
        checked = check_settings(self.method, self.pattern, sparsity, self.alpha,
                                 self.blocksize, self.metric)
        if self.allocation not in PRUNE_ALLOCATIONS:
            raise SnapPruneError(f"unknown allocation {self.allocation!r}; choose one of "
                                 f"{', '.join(PRUNE_ALLOCATIONS)}")
        if self.allocation == "owl":
            if checked[0].kind != "unstructured":
                raise SnapPruneError(f"OWL spreads an unstructured sparsity over the blocks; "
                                     f"the {self.pattern} pattern fixes each layer's: use "
                                     "--allocation uniform")
            if not (math.isfinite(self.owl_threshold) and self.owl_threshold > 0):
                raise SnapPruneError(f"the OWL outlier threshold must be > 0 (times the mean "
                                     f"score; 5 is OWL's), got {self.owl_threshold}")
            owl_sparsities([0.0, 1.0], checked[1], self.owl_lambda)  # the widest spread fits
        return checked


WIDTH_ALLOCATIONS = ("uniform", "sensitivity")


@dataclass(frozen=True)
class ShrinkSettings(MethodChoice):
    """What ``shrink`` removes: fractions of MLP neurons and of query heads. The new MLP width
    is a multiple of ``multiple_of``: 32 by default, the smallest width every output format
    quantises whole (llama.cpp's blocks of 32, the common group size 32); a GPU kernel that
    wants 64 or 128, or a group of 128, asks for it. ``allocation``: every block loses the same
    share (``uniform``, a standard config), or each block's share follows its measured
    sensitivity, the same total removed (``sensitivity``: per-block widths, written as
    llama.cpp's deci GGUF)."""

    method: str = "thanos"
    mlp: float = 0.0
    heads: float = 0.0
    metric: str | None = None
    percdamp: float = 0.01
    multiple_of: int = 32
    alpha: float = 0.0
    allocation: str = "uniform"

    kind: ClassVar[str] = "shrink"

    @property
    def pattern(self) -> str:
        return "width"

    @property
    def needs_calibration(self) -> bool:
        """The sensitivity allocation measures errors on calibration text, whatever the
        method."""
        return self.allocation == "sensitivity" or super().needs_calibration

    def resolved(self) -> ShrinkSettings:
        """A copy naming every value the run uses (metric), for records."""
        self.check()
        return replace(self, metric=self.resolved_metric)

    def check(self) -> None:
        """Refuse a bad request before any work."""
        get_method(self.method)
        check_percdamp(self.percdamp)
        if self.metric is not None and self.metric not in METRICS:
            raise SnapPruneError(f"unknown mask metric {self.metric!r}; choose one of "
                                 f"{', '.join(METRICS)}")
        for name in ("mlp", "heads"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise SnapPruneError(f"{name} must be a fraction in [0, 1), got {value}")
        if not self.mlp and not self.heads:
            raise SnapPruneError("nothing to remove: give mlp and/or heads a fraction in (0, 1)")
        if self.alpha:
            raise SnapPruneError(
                "alpha > 0 keeps outlier rows dense, and a row that keeps a column's weights "
                "cannot be cut out; shrink removes whole units (use alpha 0, or prune with "
                "the structured pattern and alpha for zeros in place)")
        if not isinstance(self.multiple_of, int) or self.multiple_of < 1:
            raise SnapPruneError(f"multiple_of must be a positive integer, "
                                 f"got {self.multiple_of}")
        if self.allocation not in WIDTH_ALLOCATIONS:
            raise SnapPruneError(f"unknown allocation {self.allocation!r}; choose one of "
                                 f"{', '.join(WIDTH_ALLOCATIONS)}")


DEPTH_SCORES = ("angular", "kl")


@dataclass(frozen=True)
class DepthSettings:
    """What ``prune-depth`` removes: ``blocks`` whole decoder blocks and ``attention``
    attention sub-layers (of the blocks kept), those whose removal changes the model least by
    ``score`` (``angular``: the angular distance between the stream entering and leaving the
    block or sub-layer, one pass; ``kl``: the measured KL divergence of the next-token
    distributions with it skipped), then, with ``repair``, the MLP output projection of each
    kept block that lost its attention or precedes removed blocks re-fitted by least squares to
    the full model's stream (``percdamp``: its ridge, a fraction of the mean diagonal)."""

    blocks: int = 0
    attention: int = 0
    score: str = "angular"
    repair: bool = True
    percdamp: float = 0.01

    kind: ClassVar[str] = "prune-depth"
    needs_calibration: ClassVar[bool] = True

    @property
    def method(self) -> str:
        return f"depth-{self.score}"

    @property
    def pattern(self) -> str:
        return "blocks"

    def resolved(self) -> DepthSettings:
        self.check()
        return self

    def check(self) -> None:
        for name in ("blocks", "attention"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SnapPruneError(f"{name} (how many to remove) must be an integer >= 0, "
                                     f"got {value!r}")
        if not self.blocks and not self.attention:
            raise SnapPruneError("nothing to remove: give blocks (whole decoder blocks) and/or "
                                 "attention (attention sub-layers) a positive count")
        if self.score not in DEPTH_SCORES:
            raise SnapPruneError(f"unknown block score {self.score!r}; choose "
                                 f"{' or '.join(DEPTH_SCORES)}")
        if not isinstance(self.repair, bool):
            raise SnapPruneError(f"repair must be true or false, got {self.repair!r}")
        check_percdamp(self.percdamp)


EXPERT_SCORES = ("reap", "frequency", "error")
EXPERT_ALLOCATIONS = ("uniform", "sensitivity")


@dataclass(frozen=True)
class ExpertSettings:
    """What ``prune-experts`` removes from a mixture of experts: whole experts (their router
    rows with them). The budget: ``keep`` (the fraction of each block's experts kept, on
    average) or ``remove`` (experts removed per block, on average). ``score`` ranks a block's
    experts (``reap``: REAP's router-weighted output norm over the expert's routed tokens;
    ``frequency``: its share of routed tokens; ``error``: the measured change of the block's
    output with that expert alone removed). ``allocation``: ``uniform`` removes the same count
    from every block, ``sensitivity`` gives each block its own count from the measured cost of
    removing its lowest-ranked experts (least summed cost for the same total). ``merge``:
    each removed expert averaged, by routed tokens, into the kept expert whose weights are
    most similar (an ablation)."""

    keep: float | None = None
    remove: int | None = None
    score: str = "reap"
    allocation: str = "uniform"
    merge: bool = False

    kind: ClassVar[str] = "prune-experts"
    needs_calibration: ClassVar[bool] = True

    @property
    def method(self) -> str:
        return f"experts-{self.score}"

    @property
    def pattern(self) -> str:
        return "experts"

    def resolved(self) -> ExpertSettings:
        self.check()
        return self

    def removed_per_block(self, experts: int) -> float:
        """Experts removed from a block of ``experts``, on average."""
        return experts * (1 - self.keep) if self.keep is not None else float(self.remove)

    def check(self) -> None:
        if (self.keep is None) == (self.remove is None):
            raise SnapPruneError("say how many experts to remove: keep (fraction kept) or "
                                 "remove (experts per block), one of them")
        if self.keep is not None and (isinstance(self.keep, bool) or not isinstance(
                self.keep, (int, float)) or not 0 < self.keep < 1):
            raise SnapPruneError(f"keep must be a fraction in (0, 1), got {self.keep!r}")
        if self.remove is not None and (isinstance(self.remove, bool) or not isinstance(
                self.remove, int) or self.remove < 1):
            raise SnapPruneError(f"remove must be a positive integer, got {self.remove!r}")
        if self.score not in EXPERT_SCORES:
            raise SnapPruneError(f"unknown expert score {self.score!r}; choose one of "
                                 f"{', '.join(EXPERT_SCORES)}")
        if self.allocation not in EXPERT_ALLOCATIONS:
            raise SnapPruneError(f"unknown allocation {self.allocation!r}; choose one of "
                                 f"{', '.join(EXPERT_ALLOCATIONS)}")
        if not isinstance(self.merge, bool):
            raise SnapPruneError(f"merge must be true or false, got {self.merge!r}")


@dataclass(frozen=True)
class QuantizeSettings:
    """Weight quantisation of the decoder blocks' linear layers: the scheme (``engine.schemes``:
    ``q4_0``, ``w4g128``, ...), GPTQ on each layer's Hessian or round-to-nearest, activation
    order, GPTQ's lazy block width and the Hessian damping; ``scales``: ``search`` (llama.cpp's
    block types: each block's scale searched by the Hessian diagonal) or ``absmax`` (the
    formula), ``None`` for the quantiser's own choice. After a prune or shrink step in the
    same job it runs joint: on the same statistics and factor, pruned weights held at 0."""

    scheme: str = "q4_0"
    method: str = "gptq"
    act_order: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    scales: str | None = None
    target_size: float | None = None
    """GGUF file size to fill, in MB (10⁶ bytes): each tensor's type chosen to minimise the
    measured error within it (``models.allocation``)."""
    target_bpw: float | None = None
    """The same budget as bits per quantised weight (scales included)."""
    embedding_type: str | None = None
    """The llama.cpp type of the token embedding and the output matrix (llama-quantize's
    ``--token-embedding-type`` and ``--output-tensor-type`` in one, as they are one matrix when
    tied); ``None``: ``q8_0`` under a plain type, the mix's rule under a mix. In a 4-bit file
    of a small model with a large vocabulary this matrix is a third of the bytes."""

    kind: ClassVar[str] = "quantize"

    def __post_init__(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, (value,) if isinstance(value, str)
                                   else tuple(value))

    @cached_property
    def parsed_mix(self) -> Mix | None:
        """llama.cpp's mix of that name (``Q4_K_M``, ...), ``None`` for a plain scheme."""
        return parse_mix(self.scheme)

    @cached_property
    def parsed_scheme(self) -> Scheme:
        """The scheme as a typed value, parsed once (the quantiser, the writers and the report
        read this, never the string); a mix's base type."""
        mix = self.parsed_mix
        return parse_scheme(self.scheme if mix is None else mix.base)

    @property
    def sized(self) -> bool:
        """Whether a size target chooses each tensor's type."""
        return self.target_size is not None or self.target_bpw is not None

    @property
    def needs_calibration(self) -> bool:
        return get_quantizer(self.method).needs_hessian

    def resolved(self) -> QuantizeSettings:
        self.check()
        name = self.parsed_scheme.name if self.parsed_mix is None else self.parsed_mix.name
        return replace(self, scheme=name, scales=scales_for(
            get_quantizer(self.method), self.parsed_scheme, self.scales))

    def check(self) -> None:
        self.parsed_scheme  # noqa: B018 (parsing is the check)
        scales_for(get_quantizer(self.method), self.parsed_scheme, self.scales)
        if self.target_size is not None and self.target_bpw is not None:
            raise SnapPruneError("give one size target: target_size (MB) or target_bpw")
        for name in ("target_size", "target_bpw"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or value <= 0
                                      or not math.isfinite(value)):
                raise SnapPruneError(f"{name} must be a positive number, got {value!r}")
        if self.sized and not self.parsed_scheme.gguf:
            raise SnapPruneError(f"a size target chooses among llama.cpp's types, not "
                                 f"{self.scheme}; use a GGUF scheme (q4_0, Q4_K_M, ...)")
        if self.sized and not self.needs_calibration:
            raise SnapPruneError("a size target measures each type's error on calibration "
                                 "statistics; use method gptq or weighted-rtn")
        if self.embedding_type is not None:
            kind = parse_scheme(self.embedding_type)
            if not (kind.gguf and self.parsed_scheme.gguf):
                raise SnapPruneError(f"embedding_type {self.embedding_type} is a llama.cpp type "
                                     "for GGUF files: use it with a GGUF scheme (q4_0, Q4_K_M, "
                                     "...) and one of llama.cpp's types (q4_0, iq4_nl, q8_0, ...)")
            if self.sized:
                raise SnapPruneError("a size target chooses the embedding's type itself; drop "
                                     "embedding_type or the size target")
        if not isinstance(self.blocksize, int) or self.blocksize < 1:
            raise SnapPruneError(f"quantiser blocksize must be a positive integer, got "
                                 f"{self.blocksize!r}")
        check_percdamp(self.percdamp)
        if self.act_order and self.method != "gptq":
            raise SnapPruneError("act_order orders GPTQ's columns; round-to-nearest has no "
                                 "order (drop act_order or use method gptq)")


RECOVER_LOSSES = ("kd", "lm")
"""``kd``: distillation from the dense model; ``lm``: next-token cross-entropy."""
RECOVER_DTYPES = ("float32", "bfloat16")
"""Training compute precision (``bfloat16``: autocast, float32 master weights)."""


@dataclass(frozen=True)
class RecoverSettings:
    """Recovery training of a pruned or shrunk model, its structure kept exactly.

    ``loss``: ``kd`` (KL divergence to the teacher's next-token distribution at
    ``temperature``, plus ``hidden_weight`` × the normalised MSE of every block's output, as
    SquareHead) or ``lm`` (next-token cross-entropy, the ablation). ``teacher``: the dense
    model (``None``: the model the job pruned, or the source a snapprune output's report
    names). ``data``: a calibration source (``auto``: the bundled C4 sample without the Hub);
    ``tokens`` are drawn as ``tokens / seqlen`` windows. AdamW with linear warm-up over
    ``warmup`` of the steps then cosine decay, gradients clipped at ``max_grad_norm``,
    ``accumulate`` micro-batches of ``batch_size`` windows per step."""

    tokens: int = 262_144
    teacher: str | None = None
    data: str = "auto"
    seqlen: int = 512
    batch_size: int = 8
    accumulate: int = 1
    lr: float = 1e-4
    warmup: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss: str = "kd"
    temperature: float = 1.0
    hidden_weight: float = 0.0
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    eval_every: int = 0
    """Held-out perplexity every this many steps (0: before and after only)."""
    eval_windows: int = 4
    checkpoint_every: int = 0
    """A resumable checkpoint every this many steps (0: 1 in 10 of the steps)."""
    seed: int = 0

    kind: ClassVar[str] = "recover"

    @property
    def needs_calibration(self) -> bool:
        return False

    @property
    def window_tokens(self) -> int:
        """Tokens one optimiser step sees (one process)."""
        return self.batch_size * self.accumulate * self.seqlen

    @property
    def steps(self) -> int:
        return max(1, self.tokens // self.window_tokens)

    def resolved(self) -> RecoverSettings:
        self.check()
        return self

    def check(self) -> None:
        if self.loss not in RECOVER_LOSSES:
            raise SnapPruneError(f"unknown recovery loss {self.loss!r}; choose kd "
                                 "(distillation from the dense model) or lm")
        for name in ("tokens", "seqlen", "batch_size", "accumulate", "eval_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SnapPruneError(f"recover {name} must be a positive integer, got {value!r}")
        for name in ("eval_every", "checkpoint_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise SnapPruneError(f"recover {name} must be an integer >= 0")
        if self.tokens < self.window_tokens:
            raise SnapPruneError(
                f"tokens {self.tokens:,} are less than one optimiser step "
                f"({self.batch_size} × {self.accumulate} windows of {self.seqlen} = "
                f"{self.window_tokens:,} tokens); raise tokens or lower batch_size / seqlen")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise SnapPruneError(f"recover {name} must be a positive number, got {value!r}")
        for name in ("warmup", "weight_decay", "hidden_weight", "max_grad_norm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise SnapPruneError(f"recover {name} must be a number >= 0, got {value!r}")
        if self.warmup >= 1:
            raise SnapPruneError("recover warmup is a fraction of the steps, in [0, 1)")
        if self.dtype not in RECOVER_DTYPES:
            raise SnapPruneError(f"recover dtype {self.dtype!r}: float32, or bfloat16 "
                                 "(autocast, float32 master weights)")
        if self.loss == "lm" and self.hidden_weight:
            raise SnapPruneError("hidden_weight distils block outputs from the teacher; the lm "
                                 "loss has no teacher")
