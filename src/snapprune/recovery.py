"""Recovery: win back what one-shot pruning cost by training the pruned model, its pruned
structure kept exactly, usually by distillation from the dense model.

The structure is kept by masking gradients: every weight that is exactly 0 when training
starts (the pruned ones; in a shrunk model, whatever happens to be 0) gets a zero gradient at
every step. With AdamW that keeps it exactly 0 for good — its moments stay 0, so its update
is 0 / (0 + ε) = 0, and weight decay multiplies 0 — while the parameters and the state dict
stay plain tensors (no parametrisation to strip before saving) and DDP reduces the gradients
as it always does (the mask is applied after its all-reduce, identically on every rank). One
multiply per masked weight per step is its whole cost.

The embedding and output matrices (never pruned) are frozen: training the decoder blocks
is what recovers the pruned layers, and the output layer's weight gradient would cost as much
as its forward pass on every token.

Several processes: ``torchrun``, the same launch as ``prune``; the student is wrapped in
``torch.nn.parallel.DistributedDataParallel`` (gloo on CPUs, NCCL on GPUs), every rank takes
its share of each batch, and DDP averages the gradients.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import latest_checkpoint, save_checkpoint
from .errors import SnapPruneError
from .eval.perplexity import perplexity
from .memory import peak_bytes
from .models import collectives
from .models.adapters import adapter_for
from .models.records import RunRecord
from .models.settings import RecoverSettings
from .models.targets import target_layers
from .outputs import json_text

CHECKPOINT_MODEL = "recover_model.safetensors"
CHECKPOINT_OPTIMIZER = "recover_optimizer.pt"
CRASH_ENV = "SNAPPRUNE_CRASH_AFTER_STEP"
"""Test hook: kill the process (SIGKILL, like ``kill -9``) right after this step's checkpoint."""


@dataclass(kw_only=True)
class RecoverRun(RunRecord):
    """What recovery did: the loss curve, held-out perplexity along the way, the tokens it
    saw and how fast, and whether the pruned structure was kept exactly."""

    settings: RecoverSettings
    teacher: str = ""
    steps: int = 0
    tokens_seen: int = 0
    curve: list[dict] = field(default_factory=list)
    heldout: list[dict] = field(default_factory=list)
    tokens_per_second: float = 0.0
    resumed_at: int | None = None
    frozen_zeros: int = 0
    """Weights held at exactly 0 (the pruned structure)."""
    structure_kept: bool = True
    data_source: str = ""


def structure_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """For each decoder-block linear layer, where its weight may train (``weight != 0``)."""
    masks = {}
    for named in target_layers(model).values():
        for name, module in named.items():
            masks[f"{name}.weight"] = module.weight.detach() != 0
    return masks


def check_pair(student: nn.Module, teacher: nn.Module | None, *, blockwise: bool = False
               ) -> None:
    """A teacher must speak the student's language: same family, vocabulary and hidden width
    (a shrunk student has narrower MLPs or fewer heads, a shallower one fewer blocks: fine for
    distilling the logits). ``blockwise`` (the per-block hidden-state term) also needs the same
    depth."""
    if teacher is None:
        return
    a, b = student.config, teacher.config
    keys = ("model_type", "vocab_size", "hidden_size") + (("num_hidden_layers",) if blockwise
                                                          else ())
    for key in keys:
        if getattr(a, key, None) != getattr(b, key, None):
            extra = (" (the per-block term --hidden-weight compares block by block: set it to "
                     "0 for a student with fewer blocks)" if key == "num_hidden_layers" else
                     "")
            raise SnapPruneError(
                f"the student's {key} is {getattr(a, key, None)} and the teacher's "
                f"{getattr(b, key, None)}: distillation needs the dense model the student was "
                f"pruned from; pass it with --teacher{extra}")


def _schedule(settings: RecoverSettings, steps: int) -> Callable[[int], float]:
    warm = max(1, round(settings.warmup * steps)) if settings.warmup else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _normalised_mse(student_states, teacher_states) -> torch.Tensor:
    """SquareHead's per-block term: ``‖h_s − h_t‖² / ‖h_t‖²`` per token, averaged over tokens
    and blocks (block outputs only: the embedding output is identical)."""
    terms = []
    for hs, ht in zip(student_states[1:], teacher_states[1:], strict=True):
        num = (hs.float() - ht.float()).square().sum(-1)
        den = ht.float().square().sum(-1).clamp_min(1e-12)
        terms.append((num / den).mean())
    return torch.stack(terms).mean()


def loss_of(student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor,
            settings: RecoverSettings) -> torch.Tensor:
    """The training loss on ``batch`` (windows × tokens), next-token positions only."""
    hidden = settings.loss == "kd" and settings.hidden_weight > 0
    out = student(batch, use_cache=False, output_hidden_states=hidden)
    logits = out.logits[:, :-1].float()
    if settings.loss == "lm":
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    with torch.no_grad():
        reference = teacher(batch, use_cache=False, output_hidden_states=hidden)
    t = settings.temperature
    target = F.log_softmax(reference.logits[:, :-1].float() / t, -1)
    log_probs = F.log_softmax(logits / t, -1)
    kd = F.kl_div(log_probs.reshape(-1, logits.shape[-1]), target.reshape(-1, logits.shape[-1]),
                  log_target=True, reduction="batchmean") * t * t
    if hidden:
        kd = kd + settings.hidden_weight * _normalised_mse(out.hidden_states,
                                                           reference.hidden_states)
    return kd


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Decoder blocks and the final norm; embeddings and the output matrix stay frozen."""
    adapter = adapter_for(model)
    prefixes = (adapter.blocks + ".",) + ((adapter.final_norm + ".",)
                                          if adapter.final_norm else ())
    return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]


def _save_checkpoint(directory: Path, step: int, model: nn.Module, optimizer, scheduler,
                     run: RecoverRun, fingerprint: dict) -> None:
    """One checkpoint, whole or absent (``checkpoints``): weights, optimiser and random
    states, and the state that names the step, all of one step."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        state = {n: p.detach().contiguous() for n, p in _trainable(model)}
        save_file(state, str(tmp / CHECKPOINT_MODEL))
        torch.save({"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()},
                   tmp / CHECKPOINT_OPTIMIZER)

    save_checkpoint(directory, f"step-{step:08d}", write, {
        "fingerprint": fingerprint, "step": step, "scheduler": scheduler.state_dict(),
        "python_rng": random.getstate(), "curve": run.curve, "heldout": run.heldout,
        "tokens_seen": run.tokens_seen, "seconds": run.total_seconds})


def run_fingerprint(fingerprint: dict | None, settings: RecoverSettings) -> dict:
    """Everything that decides a recovery's result: the caller's (the job, the training
    text's token ids), the settings and the process count."""
    return {**(fingerprint or {}), "settings": asdict(settings),
            "world": collectives.current().world}


def resumable(directory: Path, fingerprint: dict) -> tuple[Path, dict]:
    """The newest checkpoint in ``directory`` and its state, when it is whole and of the same
    run; else a one-line refusal."""
    found = latest_checkpoint(directory)
    if found is None:
        raise SnapPruneError(f"nothing to resume: {directory} holds no recovery checkpoint; "
                             "run without resume")
    where, state = found
    if state.get("fingerprint") != json.loads(json_text(fingerprint)):
        raise SnapPruneError(f"{directory} holds a recovery of another model, other settings "
                             "or other training text; run the same command as before, or "
                             "restart")
    return where, state


def _load_checkpoint(directory: Path, model: nn.Module, optimizer, scheduler, run: RecoverRun,
                     fingerprint: dict) -> int:
    from safetensors.torch import load_file

    where, state = resumable(directory, fingerprint)
    weights = load_file(where / CHECKPOINT_MODEL)
    with torch.no_grad():
        for name, param in _trainable(model):
            param.copy_(weights[name])
    saved = torch.load(where / CHECKPOINT_OPTIMIZER, weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["torch_rng"])
    scheduler.load_state_dict(state["scheduler"])
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    run.curve, run.heldout = state["curve"], state["heldout"]
    run.tokens_seen, run.total_seconds = state["tokens_seen"], state["seconds"]
    return int(state["step"])


def recover(
    student: nn.Module,
    teacher: nn.Module | None,
    data: torch.Tensor,
    settings: RecoverSettings,
    *,
    device: str | torch.device = "cpu",
    heldout: torch.Tensor | None = None,
    heldout_seqlen: int = 2048,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    fingerprint: dict | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    teacher_name: str = "",
) -> RecoverRun:
    """Train ``student`` in place on the token windows ``data`` (windows × ``seqlen``, the
    whole run's, every rank the same), its zero weights held at 0, and return the run.

    ``teacher``: the dense model (``kd``; ``None`` for ``lm``). ``heldout``: a token stream
    whose perplexity is measured before, every ``eval_every`` steps and after.
    ``checkpoint_dir``: where a resumable checkpoint (weights, optimiser, scheduler, data
    position, random states) is written every ``checkpoint_every`` steps; ``resume``
    continues from it when ``fingerprint`` matches. Works in memory: no file is needed."""
    settings.check()
    if settings.loss == "kd" and teacher is None:
        raise SnapPruneError("distillation (loss kd) needs the teacher: the dense model")
    check_pair(student, teacher,
               blockwise=settings.loss == "kd" and settings.hidden_weight > 0)
    device = torch.device(device)
    group = collectives.current()
    if settings.batch_size % group.world:
        raise SnapPruneError(f"batch_size {settings.batch_size} windows cannot be shared by "
                             f"{group.world} processes; use a multiple of {group.world}")
    steps = settings.steps
    needed = steps * settings.accumulate * settings.batch_size
    if data.shape[0] < needed or data.shape[1] != settings.seqlen:
        raise SnapPruneError(f"recovery needs {needed} windows of {settings.seqlen} tokens, "
                             f"got {tuple(data.shape)}")
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    masks = {n: m.to(device) for n, m in structure_masks(student).items()}
    run = RecoverRun(settings=settings, teacher=teacher_name, steps=steps,
                     architecture=adapter_for(student).describe(student))
    run.frozen_zeros = int(sum((~m).sum() for m in masks.values()))
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in student.parameters()):
        # a half-precision checkpoint trains on float32 weights (AdamW's updates vanish in
        # float16); --train-dtype bfloat16 autocasts the compute, the output keeps its dtype
        student.float()
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval().requires_grad_(False)
    params = dict(_trainable(student))
    for param in student.parameters():
        param.requires_grad_(False)
    for param in params.values():
        param.requires_grad_(True)
    if settings.gradient_checkpointing:
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    model = student
    if group.active:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student)
    optimizer = torch.optim.AdamW(params.values(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(settings, steps))
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    fingerprint = run_fingerprint(fingerprint, settings)
    begin = 0
    if resume:
        if directory is None:
            raise SnapPruneError("resume needs the run's output directory")
        begin = _load_checkpoint(directory, student, optimizer, scheduler, run, fingerprint)
        run.resumed_at = begin
        if log and group.is_main:
            log(f"resuming recovery at step {begin} of {steps} from {directory}")
    every = settings.checkpoint_every or max(1, steps // 10)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=settings.dtype == "bfloat16")

    def measure(step: int) -> None:
        if heldout is None or not group.is_main:
            return
        student.eval()
        with torch.no_grad():
            ppl = perplexity(student, heldout, seqlen=heldout_seqlen,
                             max_windows=settings.eval_windows, device=device, progress=False)
        student.train()
        run.heldout.append({"step": step, "tokens": run.tokens_seen,
                            "perplexity": ppl.perplexity})

    if begin == 0:
        measure(0)
    share = settings.batch_size // group.world
    elapsed = run.total_seconds
    t0 = time.perf_counter()
    bar = tqdm(range(begin, steps), desc=f"recover {settings.loss}", unit="step",
               initial=begin, total=steps, disable=not (progress and group.is_main))
    for step in bar:
        optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(settings.accumulate):
            first = (step * settings.accumulate + micro) * settings.batch_size
            batch = data[first + group.rank * share : first + (group.rank + 1) * share]
            with autocast:
                loss = loss_of(model, teacher, batch.to(device), settings)
            (loss / settings.accumulate).backward()
            total += loss.detach().double() / settings.accumulate
        if group.active:
            import torch.distributed as dist

            dist.all_reduce(total, op=dist.ReduceOp.SUM)
            total /= group.world
        value = float(total)
        if not math.isfinite(value):
            where = f"; the last checkpoint in {directory} is kept" if directory else ""
            raise SnapPruneError(f"the recovery loss is not finite at step {step} ({value}); "
                                 f"lower lr or use dtype float32{where}")
        for name, param in params.items():
            if name in masks and param.grad is not None:
                param.grad.mul_(masks[name])
        norm = torch.nn.utils.clip_grad_norm_(list(params.values()),
                                              settings.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        run.tokens_seen += settings.batch_size * settings.accumulate * settings.seqlen
        run.curve.append({"step": step + 1, "tokens": run.tokens_seen, "loss": value,
                          "lr": scheduler.get_last_lr()[0], "grad_norm": float(norm)})
        if progress and group.is_main:
            rate = (step + 1 - begin) * settings.window_tokens / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{rate:.0f}")
        if settings.eval_every and (step + 1) % settings.eval_every == 0 and step + 1 < steps:
            measure(step + 1)
        if directory is not None and (step + 1) % every == 0 and step + 1 < steps:
            run.total_seconds = elapsed + time.perf_counter() - t0
            if group.is_main:
                _save_checkpoint(directory, step + 1, student, optimizer, scheduler, run,
                                 fingerprint)
            group.barrier()
            if os.environ.get(CRASH_ENV) == str(step + 1):
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    trained = time.perf_counter() - t0
    student.eval()
    if settings.gradient_checkpointing:
        student.gradient_checkpointing_disable()
    for param in student.parameters():
        param.requires_grad_(False)
    measure(steps)
    run.tokens_per_second = (run.tokens_seen - begin * settings.window_tokens) / max(trained,
                                                                                    1e-9)
    with torch.no_grad():
        run.structure_kept = all(bool((student.get_parameter(n)[~m] == 0).all())
                                 for n, m in masks.items())
    run.total_seconds = elapsed + time.perf_counter() - start
    run.peak_memory_bytes = peak_bytes(device)
    return run


def discard_checkpoint(directory: Path) -> None:
    """Remove a finished recovery's checkpoint (snapprune's own hidden directory)."""
    shutil.rmtree(directory, ignore_errors=True)


def saved_step(directory: Path) -> int | None:
    """The step a stopped recovery in ``directory`` would resume at, or ``None``."""
    try:
        found = latest_checkpoint(directory, verify=False)
        return None if found is None else int(found[1]["step"])
    except (SnapPruneError, ValueError, KeyError, TypeError):
        return 0


def checkpoint_dir_for(out: Path) -> Path:
    """Where a run writing ``out`` keeps its recovery checkpoints (beside it, hidden)."""
    return out.parent / f".{out.name}.partial-recover"
