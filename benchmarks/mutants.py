"""Mutation check: deliberate bugs, one at a time; the tests that guard each rule must fail.

    python benchmarks/mutants.py [--only NAME ...] [--jobs 2]

Each mutant is a copy of ``src/snapprune`` with one small edit (every edit must match its
source text exactly once, so a refactor that moves the code makes the script fail loudly
instead of testing nothing). The mutant's tests (the engine tests for the maths; the run-path
tests for the rules that keep users' files and results right) run against the copy
(``PYTHONPATH`` puts it first; the script checks that the copy is what gets imported). A
mutant is *killed* when the tests fail, *survived* when they pass. Exit code 1 if any
survives: a survivor is a missing test.

Where the system can fork (Linux, macOS), the script imports the heavy libraries (torch,
transformers, pytest) once and forks one child per mutant, which puts its copy first on the path
and runs pytest in-process: each mutant then costs its tests, not seconds of imports (about half
of the whole check's time otherwise). ``--no-fork`` runs each in a fresh interpreter instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "snapprune"
ENGINE_TESTS = ("tests/test_engine_exact.py", "tests/test_engine_edges.py",
                "tests/test_engine_properties.py", "tests/test_mask_references.py",
                "tests/test_determinism.py")
QUANT_TESTS = ("tests/test_quantize_exact.py", "tests/test_blocks.py")
RULE_TESTS = ("tests/test_nothing_lost.py",)
RULE2_TESTS = ("tests/test_nothing_lost_2.py",)
FORMAT_TESTS = ("tests/test_export.py", "tests/test_gguf_types.py")
BLOCK_TESTS = ("tests/test_blocks.py",)
RECOVERY_TESTS = ("tests/test_recovery.py",)
KQUANT_TESTS = ("tests/test_kquants.py",)
MIX_TESTS = ("tests/test_mixes.py",)
DEPTH_TESTS = ("tests/test_depth.py",)
WIDTH_TESTS = ("tests/test_width_allocation.py",)
OWL_TESTS = ("tests/test_owl.py",)
LOST, LOST2 = "tests/test_nothing_lost.py::", "tests/test_nothing_lost_2.py::"
RECOVERY = "tests/test_recovery.py::"
"""A mutant whose whole file is slow runs the one test that guards its rule."""
MOE_STATS = ("tests/test_moe.py::test_unfolded_experts_compute_the_fused_model_and_fold_back_"
             "unchanged", "tests/test_moe.py::test_each_experts_statistics_are_those_of_the_"
             "tokens_routed_to_it", "tests/test_moe.py::test_a_starved_expert_falls_back_to_"
             "every_tokens_statistics_and_says_so", "tests/test_moe.py::test_sending_every_"
             "token_through_every_expert_leaves_the_block_output_routed")
EXPERT_TESTS = ("tests/test_expert_pruning.py",)
DEPTH = "tests/test_depth.py::"
DECI = "tests/test_decilm.py::"
"""The Nemotron-NAS layout's mutants: the test that guards each rule."""
SEARCH = "tests/test_search.py::"
"""The search's mutants each name the one test that guards the rule (CI time)."""


@dataclass(frozen=True)
class Mutant:
    name: str
    why: str
    file: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...] = ENGINE_TESTS


MUTANTS = (
    Mutant("residual-mask-on-original-weights",
           "global residual mask scored on the original weights instead of the updated ones",
           "engine/methods/thanos.py",
           (("    w, pat = problem.weight, problem.pattern\n",
             "    w, pat = problem.weight, problem.pattern\n    original = w.clone()\n"),
            ("free = problem.scores(weight[:, i1:], i1)",
             "free = problem.scores(original[:, i1:], i1)"))),
    Mutant("nm-mask-on-original-weights",
           "N:M groups scored on the original weights instead of the updated ones",
           "engine/methods/thanos.py",
           (("    w, pat = problem.weight, problem.pattern\n",
             "    w, pat = problem.weight, problem.pattern\n    original = w.clone()\n"),
            ("nm_mask(problem.scores(weight[:, i1:i2], i1), pat.n, pat.m)",
             "nm_mask(problem.scores(original[:, i1:i2], i1), pat.n, pat.m)"))),
    Mutant("outliers-lowest-saliency",
           "the lowest-saliency rows kept as α outlier rows instead of the highest",
           "engine/masks.py",
           (("torch.argsort(scores.sum(1), descending=True, stable=True)",
             "torch.argsort(scores.sum(1), descending=False, stable=True)"),)),
    Mutant("structured-removes-highest-columns",
           "the highest-scoring columns removed instead of the lowest (structured)",
           "engine/masks.py",
           (("columns[torch.argsort(col_scores, stable=True)[:s]] = True",
             "columns[torch.argsort(col_scores, descending=True, stable=True)[:s]] = True"),)),
    Mutant("structured-columns-include-outliers",
           "structured column scores summed over all rows, outlier rows included",
           "engine/masks.py",
           (("col_scores = scores[~outliers].sum(0)", "col_scores = scores.sum(0)"),)),
    Mutant("obs-wrong-inverse-diagonal",
           "obs metric divides by U_jj² instead of the trailing inverse's diagonal",
           "engine/factor.py",
           (("return upper[i1:, i1:].square().sum(0)",
             "return upper[i1:, i1:].diagonal().square()"),)),
    Mutant("obs-inverse-over-all-columns",
           "obs metric ignores which columns are still free (always the full inverse)",
           "engine/problem.py",
           (("hinv_diag = trailing_inverse_diagonal(self.upper, i1)[: i2 - i1]",
             "hinv_diag = trailing_inverse_diagonal(self.upper, 0)[i1:i2]"),)),
    Mutant("wanda-norm-not-squared",
           "Wanda's score uses ‖x‖ where the squared score needs ‖x‖² (ranks change)",
           "engine/scores.py",
           (("return w2.mul_(sq_norms)", "return w2.mul_(sq_norms.sqrt())"),)),
    Mutant("row-balance-extra-to-highest",
           "Wanda's leftover removals go to the rows whose next candidate scores highest",
           "engine/masks.py",
           (("chosen = torch.argsort(next_scores, stable=True)[:extra]",
             "chosen = torch.argsort(next_scores, descending=True, stable=True)[:extra]"),)),
    Mutant("damping-absolute",
           "damping added as an absolute λ instead of a fraction of the mean diagonal",
           "engine/factor.py",
           (("diag += percdamp * diag.mean()", "diag += percdamp"),)),
    Mutant("thanos-update-frozen-columns-free",
           "the block update also reaches columns of earlier, frozen blocks",
           "engine/thanos_update.py",
           (("weight[:, i1:] -= (lam @ u_bb.T) @ upper[i1:i2, i1:]",
             "weight[:, i1:] -= (lam @ u_bb.T) @ upper[i1:i2, i1:]\n"
             "        weight[:, :i1] -= 1e-3 * lam.sum() / max(1, i1)"),)),
    Mutant("sparsegpt-share-off-by-one-block",
           "SparseGPT's per-block share computed from the wrong block bounds",
           "engine/methods/sparsegpt.py",
           (("k = target_count(problem.sparsity, rows * i2) - target_count(problem.sparsity, "
             "rows * i1)",
             "k = target_count(problem.sparsity, rows * (i2 - i1))"),)),
    Mutant("target-count-rounds",
           "the exact weight count rounded instead of floored",
           "engine/masks.py",
           (("return min(total, math.floor(sparsity * total + 1e-9))",
             "return min(total, round(sparsity * total))"),)),
    Mutant("segment-padded-to-smallest-count",
           "a batched-solve segment padded to its smallest row count, cutting off the removals "
           "of its other rows",
           "engine/thanos_update.py",
           (("segments.append((starts[j], ends[i - 1], values[i - 1]))",
             "segments.append((starts[j], ends[i - 1], values[j]))"),)),
    Mutant("deterministic-sums-in-float32",
           "deterministic statistics summed in float32, so their order (batching, ranks) "
           "changes them",
           "engine/stats.py",
           (("        sums = torch.float64 if deterministic else dtype\n",
             "        sums = dtype\n"),)),
    Mutant("deterministic-factorisation-threaded",
           "whole-matrix factorisations left on every thread in deterministic mode",
           "engine/determinism.py",
           (('    if not enabled() or device.type != "cpu" or torch.get_num_threads() == 1:\n',
             "    if True:\n"),)),
    # The rules that keep a user's files and results right (issue 21).
    Mutant("overwrite-replaces-any-directory",
           "--overwrite replaces a directory snapprune did not write",
           "outputs.py",
           (("    if not path.is_dir() or path.is_symlink():\n        return False\n",
             "    return True\n"),), RULE_TESTS),
    # Nothing lost, round two (issue 26).
    Mutant("output-lock-not-taken",
           "two runs write one output at once",
           "outputs.py",
           (("        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)\n", "        pass\n"),),
           RULE2_TESTS),
    Mutant("ownership-by-report-file",
           "a report file (which --json can put anywhere) makes a directory snapprune's",
           "outputs.py",
           (("    return (path / MARKER).is_file() or not any(path.iterdir())",
             "    return (path / REPORT_NAME).is_file() or not any(path.iterdir())"),),
           RULE2_TESTS),
    Mutant("out-may-overlap-model",
           "--out equal to, inside or holding --model is accepted",
           "run.py",
           (("    if out == source or inside or out in source.parents:\n", "    if False:\n"),),
           (LOST2 + "test_out_equal_to_inside_or_holding_the_model_is_refused",)),
    Mutant("resume-skips-the-output-check",
           "--resume replaces an output that a later run finished there",
           "run.py",
           (("    out = check_output_dir(out, overwrite)\n",
             "    out = Path(out).expanduser().resolve() if resume else check_output_dir(out, "
             "overwrite)\n"),),
           ("tests/test_nothing_lost_2.py::"
            "test_resume_never_replaces_an_output_written_after_the_stop",)),
    Mutant("recovery-fingerprint-without-training-ids",
           "a recovery resumes on changed training text",
           "steps/recover.py",
           ((', "training_ids": ids_digest(data)})', "})"),),
           (LOST2 + "test_recovery_resumes_only_on_the_same_training_text_and_whole_checkpoints",)),
    Mutant("checkpoint-hashes-not-verified",
           "a checkpoint changed or torn since it was written is resumed from",
           "checkpoints.py",
           (("            if not path.is_file() or file_digest(path) != digest:\n",
             "            if not path.is_file():\n"),),
           ("tests/test_nothing_lost_2.py::"
            "test_a_checkpoint_is_whole_or_the_previous_one_stays",)),
    Mutant("recipe-aliases-allowed",
           "a YAML alias bomb in a recipe is expanded",
           "recipes.py",
           (("            if self.check_event(yaml.AliasEvent):\n", "            if False:\n"),),
           (LOST2 + "test_a_yaml_alias_bomb_is_refused_at_once",)),
    Mutant("recipe-types-unchecked",
           "recipe values of the wrong type are taken ('false' runs the dense evaluation)",
           "recipes.py",
           (("        if not _accepts(value, hints[name]):\n", "        if False:\n"),),
           (LOST2 + "test_recipe_values_of_the_wrong_type_are_one_line",)),
    Mutant("stream-restart-not-required",
           "a new streamed run silently discards the saved progress of a stopped one",
           "models/streaming.py",
           (("        if stopped is not None and not restart:\n",
             "        if False:\n"),),
           ("tests/test_nothing_lost.py::"
            "test_a_new_run_never_discards_saved_progress",)),
    Mutant("fingerprint-without-the-job",
           "the resume fingerprint leaves out the job (seed, batch size, calibration, ...)",
           "models/streaming.py",
           (("    fingerprint = {**(fingerprint or {}), ", "    fingerprint = {"),),
           (LOST + "test_resume_refuses_any_other_job",)),
    Mutant("fingerprint-without-calibration-ids",
           "the resume fingerprint leaves out the hash of the calibration token ids",
           "models/streaming.py",
           (('                   "calibration_ids": ids_digest(ids)}',
             '                   }'),),
           (LOST + "test_resume_refuses_calibration_text_that_changed",)),
    Mutant("sweep-key-without-model",
           "a sweep cell's key leaves out the model it ran on",
           "sweep.py",
           (('text = json.dumps({**asdict(self), "model": model, "revision": revision,',
             'text = json.dumps({**asdict(self), "revision": revision,'),),
           (LOST + "test_a_sweep_of_another_model_never_reads_this_models_cells",)),
    Mutant("percdamp-zero-becomes-default",
           "a grid's percdamp 0 runs at the default (an `or` default)",
           "sweep.py",
           (('percdamp=DEFAULTS["percdamp"] if self.percdamp is None else self.percdamp,',
             'percdamp=self.percdamp or DEFAULTS["percdamp"],'),),
           (LOST + "test_a_grid_percdamp_of_zero_runs_at_zero",)),
    Mutant("percdamp-not-checked",
           "percdamp is not checked before the model is loaded",
           "models/settings.py",
           (("        check_percdamp(self.percdamp)\n        sparsity = self.sparsity\n",
             "        sparsity = self.sparsity\n"),),
           (LOST + "test_settings_are_checked_before_the_model_is_loaded",)),
    Mutant("reports-keep-nan",
           "reports keep NaN (not JSON) instead of null",
           "outputs.py",
           (("        return value if math.isfinite(value) else None\n",
             "        return value\n"),), RULE_TESTS),
    # The quantiser (issue 19): GPTQ's update, its groups, the grids.
    Mutant("gptq-error-not-scaled",
           "GPTQ spreads the raw rounding error, not divided by the factor's diagonal",
           "engine/gptq.py",
           (("            error = (column - value) / u[i, i]\n",
             "            error = column - value\n"),), QUANT_TESTS),
    Mutant("gptq-lazy-update-dropped",
           "GPTQ's block update never reaches the columns after the block",
           "engine/gptq.py",
           (("        w[:, i2:] -= errors @ upper[i1:i2, i2:]\n", ""),), QUANT_TESTS),
    Mutant("gptq-pruned-weights-not-held",
           "joint quantisation rounds pruned weights instead of holding them at 0",
           "engine/gptq.py",
           (("                code = torch.where(keep_zero[:, j], scheme.zero_code(p), code)\n",
             "                code = code\n"),),
           ("tests/test_quantize_exact.py::"
            "test_joint_quantisation_keeps_every_pruned_weight_exactly_zero",)),
    Mutant("act-order-groups-fitted-late",
           "with act order, groups fitted in processing order instead of up front",
           "engine/gptq.py",
           (("    params = group_params(weight, scheme, scale_dtype, mask, importance) "
             "if static else \\\n",
             "    params = None if static else \\\n"),
            ("        [None] * scheme.groups(cols)\n",
             "        [None] * scheme.groups(cols)\n    params = [None] * scheme.groups(cols)\n"),
            ), QUANT_TESTS),
    Mutant("act-order-ascending",
           "activation order from the smallest Hessian diagonal up",
           "engine/quantizers.py",
           (("order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)",
             "order = torch.argsort(torch.diagonal(hessian), descending=False, stable=True)"),),
           QUANT_TESTS),
    Mutant("q4_0-scale-without-sign",
           "q4_0's block scale from the largest magnitude, its sign lost",
           "engine/blocks.py",
           (("        return Params(signed_max(w) / -8.0)\n",
             "        return Params(w.abs().max(-1).values / -8.0)\n"),),
           ("tests/test_quantize_exact.py::"
            "test_gguf_grids_are_llama_cpps_own",)),
    Mutant("gguf-scale-not-float16",
           "llama.cpp's block scales used in float32, not the float16 the file stores",
           "engine/blocks.py",
           (("        return Params(half(p.scale), None if p.zero is None else half(p.zero))\n",
             "        return Params(p.scale, None if p.zero is None else half(p.zero))\n"),),
           QUANT_TESTS),
    Mutant("q8_0-divisor",
           "q8_0's scale divides by 128 instead of 127",
           "engine/blocks.py",
           (("w.abs().max(-1).values / 127.0", "w.abs().max(-1).values / 128.0"),),
           ("tests/test_quantize_exact.py::"
            "test_gguf_grids_are_llama_cpps_own",)),
    Mutant("search-without-the-formula",
           "the scale search starts from its first candidate, not the formula's grid",
           "engine/blocks.py",
           (("        best, best_error = base, self.weighted_error(w, base, v)\n",
             "        best = candidates[0]\n"
             "        best_error = self.weighted_error(w, best, v)\n"),),
           BLOCK_TESTS),
    Mutant("search-unweighted",
           "the scale search's refit ignores the importance (plain least squares)",
           "engine/blocks.py",
           (("        candidates = [self._refit(w, self._start(w, extreme, step), v)\n",
             "        candidates = [self._refit(w, self._start(w, extreme, step), v * 0 + 1)\n"),),
           BLOCK_TESTS),
    Mutant("search-error-unweighted",
           "candidates compared by their unweighted error",
           "engine/blocks.py",
           (("        return (error * error * importance).sum(-1)\n",
             "        return (error * error).sum(-1)\n"),), BLOCK_TESTS),
    Mutant("affine-refit-minimum-sign",
           "q4_1/q5_1's least-squares minimum with the cross term's sign flipped",
           "engine/blocks.py",
           (("        minimum = torch.where(ok, (a * sw - b * cw) / safe, start.zero)\n",
             "        minimum = torch.where(ok, (a * sw + b * cw) / safe, start.zero)\n"),),
           BLOCK_TESTS),
    Mutant("iq4_nl-level",
           "one of iq4_nl's 16 levels off by one",
           "engine/blocks.py",
           (("-35, -22, -10, 1, 13, 25,", "-35, -22, -10, 1, 13, 26,"),),
           ("tests/test_blocks.py::"
            "test_the_packed_bytes_decode_in_gguf_py_to_exactly_our_values",)),
    Mutant("q5-high-bits-reversed",
           "q5_0/q5_1's fifth bits packed from the most significant bit",
           "engine/blocks.py",
           (("<< np.arange(BLOCK, dtype=np.uint32)",
             "<< np.arange(BLOCK - 1, -1, -1, dtype=np.uint32)"),), BLOCK_TESTS),
    Mutant("gptq-groups-fitted-without-importance",
           "GPTQ's natural-order groups fitted by the formula, not the weighted search",
           "engine/gptq.py",
           (("                    _part(importance, j, j + ahead.shape[1]))\n",
             "                    None)\n"),), QUANT_TESTS),
    Mutant("refit-without-the-hessian",
           "the scales re-fitted after GPTQ against the weights, not the layer's output",
           "engine/refit.py",
           (("    hw = (w @ h).reshape(rows, spans, width)  # (H w_r) by span\n",
             "    hw = w.reshape(rows, spans, width)\n"),), QUANT_TESTS),
    Mutant("weighted-rtn-on-the-formula",
           "weighted-rtn rounds on the formula's scales",
           "engine/quantizers.py",
           (("    values, codes, params = round_to_nearest(w, scheme, scale_dtype, mask, "
             "importance)\n",
             "    values, codes, params = round_to_nearest(w, scheme, scale_dtype, mask, "
             "None)\n"),),
           QUANT_TESTS),
    Mutant("asym-zero-point-not-integer",
           "the asymmetric zero point left unrounded",
           "engine/schemes.py",
           (("        zero = torch.clamp(self.qmin - low / scale, self.qmin, self.qmax).round()\n",
             "        zero = torch.clamp(self.qmin - low / scale, self.qmin, self.qmax)\n"),),
           QUANT_TESTS),
    # The formats: what llama.cpp and transformers read back.
    Mutant("gguf-q-rows-in-transformers-order",
           "q/k rows written in transformers' order (llama.cpp pairs adjacent dimensions)",
           "export/gguf.py",
           (("        parts = tuple(None if p is None else _permute(p, rows_heads) "
             "for p in parts)\n", "        pass\n"),), FORMAT_TESTS),
    Mutant("gguf-nibbles-swapped",
           "4-bit blocks pack the second half of a block in the low nibble",
           "engine/blocks.py",
           (("            parts.append((low[..., :16] | (low[..., 16:] << 4))"
             ".astype(np.uint8))\n",
             "            parts.append((low[..., 16:] | (low[..., :16] << 4))"
             ".astype(np.uint8))\n"),),
           FORMAT_TESTS),
    # The super-block types: their bytes, their fit, GPTQ and the refit on them.
    Mutant("kquant-scale-high-bits-swapped",
           "q4_k/q5_k: the high bits of sub-scales 4-7 packed beside the minima's low bits",
           "engine/kquants.py",
           (("    out[:, 0:4] = _u8((sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6))\n",
             "    out[:, 0:4] = _u8((sc[:, :4] & 63) | ((m[:, 4:] >> 4) << 6))\n"),),
           KQUANT_TESTS),
    Mutant("kquant-q3k-hmask-order",
           "q3_k: the high bit of each code in the wrong bit of hmask",
           "engine/kquants.py",
           (("np.arange(2).reshape(1, 2, 1, 1) * 4", "np.arange(2).reshape(1, 2, 1, 1) * 2"),),
           KQUANT_TESTS),
    Mutant("kquant-q6k-quarters-swapped",
           "q6_k: the low nibbles of the second and third quarters swapped",
           "engine/kquants.py",
           (("        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4),\n"
             "                             low[:, :, 1] | (low[:, :, 3] << 4)], 2)\n",
             "        ql = np.concatenate([low[:, :, 0] | (low[:, :, 1] << 4),\n"
             "                             low[:, :, 2] | (low[:, :, 3] << 4)], 2)\n"),),
           KQUANT_TESTS),
    Mutant("kquant-d-not-float16",
           "the super-block factor used unrounded (the file stores it as float16)",
           "engine/kquants.py",
           (("        low, high = self.scale_range\n        d = half(d)\n",
             "        low, high = self.scale_range\n"),), KQUANT_TESTS),
    Mutant("kquant-search-accepts-worse",
           "the super-block search keeps candidates up to 10 % worse than the best so far",
           "engine/kquants.py",
           (("                better = error < best_error\n",
             "                better = error < best_error * 1.1\n"),), KQUANT_TESTS),
    Mutant("kquant-refit-idle",
           "the refit after GPTQ keeps the super-block factors it was given",
           "engine/kquants.py",
           (("        d = half(theta[:, :n])\n", "        d = half(supers[..., 0])\n"),),

           ("tests/test_kquants.py::"
            "test_the_refit_after_gptq_solves_the_output_least_squares_in_d",)),
    # llama.cpp's mixes, its fallback, and the allocation to a size.
    Mutant("mix-more-bits-last-eighth",
           "use_more_bits misses the first of the last eighth of the layers",
           "engine/mixes.py",
           (("    return i < n // 8 or i >= 7 * n // 8 or",
             "    return i < n // 8 or i > 7 * n // 8 or"),),
           MIX_TESTS),
    Mutant("mix-fallback-q4k",
           "q4_k falls back to q4_0 (llama.cpp substitutes q5_0)",
           "engine/mixes.py",
           (('"q4_k": "q5_0"', '"q4_k": "q4_0"'),), MIX_TESTS),
    Mutant("mix-q3km-attn-v-layers",
           "Q3_K_M gives attn_v q5_k in the first 3 layers (llama.cpp: 2)",
           "engine/mixes.py",
           (("_first_layers(2)", "_first_layers(3)"),), MIX_TESTS),
    Mutant("allocation-overspends",
           "the greedy fill takes upgrades past the budget",
           "engine/mixes.py",
           (("                if 0 < extra <= left and saved > 0",
             "                if 0 < extra <= left + 64 and saved > 0"),), MIX_TESTS),
    Mutant("allocation-no-fill",
           "the allocation stops at the Lagrangian sweep, leaving budget unspent",
           "engine/mixes.py",
           (("    left = budget - total(choice)\n", "    left = 0\n"),), MIX_TESTS),
    Mutant("depth-repair-sign",
           "the repair subtracts the least-squares change instead of adding it",
           "models/depth.py",
           (("(weight.double() + delta)", "(weight.double() - delta)"),), DEPTH_TESTS),
    Mutant("depth-repair-target-before-run",
           "the repair's target is the stream before the removed run, not after it",
           "models/depth.py",
           (("                for later in run:\n                    x = _run(blocks[later], "
             "inputs, x)\n", ""),), DEPTH_TESTS),
    Mutant("depth-no-ridge",
           "the repair drops its ridge term",
           "engine/depth.py",
           (("        damp = percdamp * diagonal.mean().clamp_min(1e-12)",
             "        damp = 0.0 * diagonal.mean().clamp_min(1e-12)"),), DEPTH_TESTS),
    Mutant("depth-layer-idx-kept",
           "kept blocks keep their old layer_idx (the KV cache slots no longer match)",
           "models/depth.py",
           (("                module.layer_idx = position\n",
             "                module.layer_idx = module.layer_idx\n"),), DEPTH_TESTS),
    Mutant("depth-removes-the-highest",
           "the blocks that change the model most are removed",
           "models/depth.py",
           (("key=lambda s: (s.value(score), -s.index))",
             "key=lambda s: (-s.value(score), -s.index))"),), DEPTH_TESTS),
    Mutant("depth-kl-reversed",
           "the KL score measures KL(cut ‖ full) instead of KL(full ‖ cut)",
           "models/depth.py",
           (("kl_from_logits(_logits(model, streams[-1]), _logits(model, x))",
             "kl_from_logits(_logits(model, x), _logits(model, streams[-1]))"),), DEPTH_TESTS),
    Mutant("depth-repair-unchecked",
           "a projection whose output passes a norm before the stream is repaired anyway",
           "models/depth.py",
           (("    if not _adds_straight(block, layer, inputs, cut[0]):",
             "    if False:"),), DEPTH_TESTS),
    Mutant("depth-layer-types-kept",
           "config.layer_types keeps the removed blocks' entries",
           "models/depth.py",
           (("        config.layer_types = [types[i] for i in kept]", "        pass"),),
           DEPTH_TESTS),
    Mutant("depth-attention-norm-written",
           "an attention-free block's unused norm is written to the deci GGUF",
           "export/gguf.py",
           (("        if (tied and name == \"lm_head.weight\") or name in unused:",
             "        if tied and name == \"lm_head.weight\":"),),
           ("tests/test_depth.py::"
            "test_an_attention_free_gguf_is_deci_and_runs_in_llama_cpp",)),
    Mutant("depth-attention-from-removed-blocks",
           "attention sub-layers are chosen among blocks already removed",
           "models/depth.py",
           (("(s for s in scores if s.index not in set(removed)), key=lambda s: s.index)",
             "scores, key=lambda s: s.index)"),),
           ("tests/test_depth.py::"
            "test_attention_scores_follow_their_definitions",)),
    Mutant("depth-no-attention-cache-silent",
           "a block without attention writes nothing to the KV cache (positions miscounted)",
           "models/depth.py",
           (("            cache.update(one, one, self.layer_idx)", "            pass"),),

           ("tests/test_depth.py::"
            "test_a_removed_attention_is_the_block_with_attention_adding_nothing",)),
    # shrink --allocation sensitivity: the costs, the allocation, the heterogeneous model.
    Mutant("widths-allocation-maximises",
           "the allocation picks the most costly counts instead of the least",
           "engine/widths.py",
           (("        best, pick = candidate.min(dim=1)",
             "        best, pick = candidate.max(dim=1)"),),
           WIDTH_TESTS),
    Mutant("widths-curve-steps",
           "a cost curve is read as a step (the lower measured count) instead of linearly",
           "engine/widths.py",
           (("                return ca + (cb - ca) * (count - a) / (b - a)",
             "                return ca"),), WIDTH_TESTS),
    Mutant("widths-cost-ratio-of-means",
           "a block's cost divides by the mean stream energy, not each token's own",
           "models/width_sensitivity.py",
           (("            weights = 1.0 / out.pow(2).sum(-1).reshape(-1).clamp_min(1e-30)",
             "            weights = (1.0 / out.pow(2).sum(-1).mean()).expand(out.shape[0] * "
             "out.shape[1])"),), WIDTH_TESTS),
    Mutant("widths-stream-not-propagated",
           "every block is measured on the first block's inputs",
           "models/width_sensitivity.py",
           (("            stream.batches[b] = out.to(x.device, x.dtype)\n            seen.clear()",
             "            seen.clear()"),), WIDTH_TESTS),
    Mutant("widths-share-unbounded",
           "a block may lose up to 90 % whatever the uniform share",
           "models/width_sensitivity.py",
           (("min(MOST_REMOVED, SPREAD * share)", "MOST_REMOVED"),), WIDTH_TESTS),
    Mutant("widths-kv-groups-kept",
           "a block with fewer query heads keeps the widest block's heads per key/value head",
           "models/block_shapes.py",
           (("            attention.num_key_value_groups = shape.heads // shape.kv_heads",
             "            pass"),),
           WIDTH_TESTS),
    Mutant("widths-gguf-one-ffn-width",
           "the deci GGUF states one FFN width for every block",
           "export/gguf.py",
           (("        writer.add_feed_forward_length([w.ffn for w in widths])",
             "        writer.add_feed_forward_length(config.intermediate_size)"),), WIDTH_TESTS),
    Mutant("widths-gguf-rope-order-global-heads",
           "q/k rows are reordered for llama.cpp's rope with the config's head count, not the "
           "block's",
           "export/gguf.py",
           (("            rows_heads = own.heads if layer.endswith(\"q_proj\") else own.kv_heads",
             "            rows_heads = (config.num_attention_heads if layer.endswith(\"q_proj\")"
             " else own.kv_heads)"),), WIDTH_TESTS),
    # prune --allocation owl.
    Mutant("owl-most-outliers-pruned-most",
           "the blocks with the most outliers get the highest sparsity",
           "engine/owl.py",
           (("    sparsity = 1 - (density - density.mean() + (1 - target))",
             "    sparsity = density - density.mean() + target"),), OWL_TESTS),
    Mutant("owl-norm-not-square-rooted",
           "the outlier score multiplies by the squared input norm instead of the norm",
           "engine/owl.py",
           (("torch.float32).sqrt()[None, :]", "torch.float32)[None, :]"),), OWL_TESTS),
    Mutant("owl-own-sparsity-ignored",
           "every layer is pruned to the target, not its block's OWL sparsity",
           "models/prune.py",
           (("        sparsity=settings.resolved_sparsity if sparsity is None else sparsity,",
             "        sparsity=settings.resolved_sparsity,"),), OWL_TESTS),
    Mutant("owl-stream-not-propagated",
           "every block's ratio is measured on the first block's inputs",
           "models/owl.py",
           (("        propagate(block, stream, device)\n", ""),), OWL_TESTS),
    Mutant("owl-threshold-ignored",
           "an outlier is any score above the mean, whatever the threshold",
           "engine/owl.py",
           (("(flat > threshold * flat.mean())", "(flat > flat.mean())"),), OWL_TESTS),
    Mutant("moe-expert-sees-every-token",
           "an expert's layers see every token, not the ones routed to it",
           "models/experts.py",
           (("                y = self._windowed(e, hidden_states, token)",
             "                y = self._windowed(e, hidden_states, None)[token]"),), MOE_STATS),
    Mutant("moe-router-weight-dropped",
           "an expert's output enters the block without its router weight",
           "models/experts.py",
           (("(y * top_k_weights[token, slot, None])", "(y)"),), MOE_STATS),
    Mutant("moe-starved-expert-kept-routed",
           "an expert below --moe-min-tokens keeps its few routed tokens' statistics",
           "models/experts.py",
           (('        if policy.mode == "routed" and any(starved.values()):',
             '        if False:'),), MOE_STATS),
    Mutant("moe-all-tokens-rows-misread",
           "an expert run on every token gives its first rows, not the routed tokens' rows",
           "models/experts.py",
           (("                y = self._windowed(e, hidden_states, None)[token]",
             "                y = self._windowed(e, hidden_states, None)[:token.numel()]"),),
           MOE_STATS),
    Mutant("moe-router-rows-kept",
           "a removed expert's router row stays: its tokens go nowhere instead of elsewhere",
           "models/expert_pruning.py",
           (("        _keep_router_rows(block.get_submodule(adapter.moe.router), kept,\n"
             "                          experts.num_experts)\n", "        pass\n"),),
           EXPERT_TESTS),
    Mutant("moe-measured-removal-not-rerouted",
           "a removal's cost is measured with the removed expert still scored by the router",
           "models/expert_pruning.py",
           (("    _keep_router_rows(router, kept, experts.num_experts)\n", "    pass\n"),),
           EXPERT_TESTS),
    Mutant("moe-reap-without-router-weight",
           "REAP's saliency without the router weight (the output norm alone)",
           "models/expert_pruning.py",
           (("(gates[token, slot].float() * norms)", "(norms)"),), EXPERT_TESTS),
    Mutant("moe-most-useful-removed",
           "the highest-ranked experts are removed instead of the lowest",
           "models/expert_pruning.py",
           (("        block.removed = sorted(block.ranking[:count])",
             "        block.removed = sorted(block.ranking[len(block.ranking) - count:])"),),
           EXPERT_TESTS),
    Mutant("moe-dense-blocks-not-renumbered",
           "after prune-depth, Qwen-MoE's dense blocks keep their old indices",
           "models/depth.py",
           (("        config.mlp_only_layers = [p for p, block in enumerate(new)",
             "        config.mlp_only_layers = config.mlp_only_layers or [p for p, block in "
             "enumerate(new)"),),
           ("tests/test_moe.py::test_removing_a_block_renumbers_which_blocks_are_dense",)),
    Mutant("moe-stream-names-not-mapped",
           "a streamed Mixtral reads its experts under the model's names, not the checkpoint's",
           "models/streaming.py",
           (("        _materialise(model, {unstored(n): t", "        _materialise(model, {n: t"),),
           ("tests/test_moe.py::test_a_streamed_moe_equals_the_one_pruned_in_memory",)),
    Mutant("moe-gguf-top-k-unchecked",
           "a mixture whose top-k renormalisation differs from llama.cpp's is written anyway",
           "export/gguf.py",
           (("    if normalised != arch.normalised_top_k:", "    if False:"),),
           ("tests/test_moe.py::test_a_mixture_llama_cpp_cannot_hold_is_refused_before_any_"
            "work",)),
    Mutant("moe-mix-eight-expert-rule-missed",
           "an 8-expert model's attn_v/attn_k keep the mix's own types, not llama.cpp's q8_0",
           "engine/mixes.py",
           (("    return slot.experts == 8\n", "    return False\n"),),
           ("tests/test_mixes.py::test_every_mix_of_an_eight_expert_model_is_llama_cpps",)),
    Mutant("moe-mix-expert-count-not-read",
           "the mixes see a mixture as a dense model (no expert count in the tensor slots)",
           "models/slots.py",
           (("rows, cols, gqa, experts=experts))", "rows, cols, gqa))"),),
           ("tests/test_mixes.py::test_every_mix_of_an_eight_expert_model_is_llama_cpps",)),
    Mutant("moe-compressed-names-not-stored",
           "a compressed-tensors Mixtral keeps snapprune's expert names, not the checkpoint's",
           "export/compressed.py",
           (("    state = {stored(k): v for k, v in state.items()}\n", ""),),
           ("tests/test_moe.py::test_a_pruned_quantised_moe_as_compressed_tensors_loads_in_"
            "transformers",)),
    Mutant("moe-compressed-router-not-ignored",
           "a compressed-tensors mixture does not list its routers in ignore",
           "export/compressed.py",
           (("record.quantized] + _routers(model)", "record.quantized]"),),
           ("tests/test_moe.py::test_a_pruned_quantised_moe_as_compressed_tensors_loads_in_"
            "transformers",)),
    Mutant("search-keeps-the-worst",
           "the search keeps the structure with the highest held-out loss",
           "steps/search.py",
           (("tried.loss < run.best.loss", "tried.loss > run.best.loss"),),
           (SEARCH + "test_the_search_keeps_the_least_loss_and_saves_that_structure",)),
    Mutant("search-width-not-widest",
           "a structure whose full MLP fits the budget still has its MLP cut",
           "models/structure_budget.py",
           (("    if fits(geometry.units):\n        return geometry.units\n", ""),),
           (SEARCH + "test_every_structure_of_the_grid_fits_the_budget_with_the_widest_mlp",)),
    Mutant("search-attention-norm-counted-kept",
           "a block without attention is counted with its attention norm, which the file drops",
           "models/structure_budget.py",
           (("    attention_cost += Cost(0, norm_bytes, norm_bytes)\n", ""),),
           (SEARCH + "test_a_structures_cost_is_its_cut_model_and_its_gguf_file",)),
    Mutant("search-scored-on-calibration-windows",
           "structures are scored on the windows they were cut on",
           "steps/search.py",
           (("HELD_OUT_SEED = 1_000", "HELD_OUT_SEED = 0"),),
           (SEARCH + "test_structures_are_scored_on_windows_they_were_not_cut_on",)),
    Mutant("search-depth-not-searched",
           "the grid never removes whole blocks",
           "models/structure_budget.py",
           (("    for d in _spread(depth_top, points):", "    for d in [0]:"),),
           (SEARCH + "test_every_structure_of_the_grid_fits_the_budget_with_the_widest_mlp",)),
    Mutant("shrink-after-attention-removal-rebuilt-whole",
           "shrink rebuilds blocks that lost their attention with a fresh attention",
           "models/shrink.py",
           (("            remove_attention(smaller, new_blocks[index])",
             "            pass"),),
           (SEARCH + "test_a_structures_cost_is_its_cut_model_and_its_gguf_file",)),
    Mutant("moe-expert-statistics-not-windowed",
           "in deterministic mode an expert's statistics are reduced per batch, not per window",
           "models/experts.py",
           (("        if not self.window:\n", "        if True:\n"),),
           ("tests/test_determinism.py::test_a_mixture_is_bit_identical_for_any_batch_size",)),
    Mutant("recovery-gradients-not-masked",
           "recovery lets pruned weights train (gradients not masked)",
           "recovery.py",
           (("                param.grad.mul_(masks[name])\n", "                pass\n"),),
           RECOVERY_TESTS),
    Mutant("depth-first-block-attention-removable",
           "the first kept block's attention may be removed (its deci file does not load)",
           "models/depth.py",
           (("    candidates = [s for s in kept[1:] if s.index not in free]\n",
             "    candidates = [s for s in kept if s.index not in free]\n"),),
           (DEPTH + "test_the_first_kept_block_keeps_its_attention_however_it_scores",)),
    Mutant("decilm-width-rounds-down",
           "a Nemotron-NAS width is its multiplier's width rounded down, not up to 256",
           "models/decilm.py",
           (("else width + WIDTH_MULTIPLE - width % WIDTH_MULTIPLE\n",
             "else width - width % WIDTH_MULTIPLE\n"),),
           (DECI + "test_every_width_of_256_has_a_multiplier_the_runtimes_read_back",)),
    Mutant("decilm-stores-the-unused-norm",
           "an attention-free block's norm is stored in the Nemotron-NAS checkpoint",
           "models/decilm.py",
           (("(adapter.decoder_blocks(model)) if attention_free(block)}\n",
             "(adapter.decoder_blocks(model)) if False}\n"),),
           (DECI + "test_blocks_of_different_shapes_are_written_as_nemotron_nas",)),
    Mutant("decilm-group-inverted",
           "n_heads_in_group read as the key/value head count",
           "models/decilm.py",
           (("0 if free else heads // group,\n", "0 if free else group,\n"),),
           (DECI + "test_snapprune_reads_the_layout_back_to_the_same_logits",)),
    Mutant("decilm-standard-config-for-differing-blocks",
           "blocks of different shapes saved under the standard config",
           "export/hf.py",
           (("    return widths if len(set(widths)) > 1 else None\n", "    return None\n"),),
           (DECI + "test_blocks_of_different_shapes_are_written_as_nemotron_nas",)),
    Mutant("decilm-per-block-heads-accepted",
           "per-block query heads requested for --format hf are not refused",
           "models/decilm.py",
           (("    if heads_vary:\n", "    if False:\n"),),
           (DECI + "test_shapes_the_layout_cannot_hold_are_refused_in_one_line",)),
    Mutant("search-hf-keeps-attention",
           "a search for --format hf never removes attention, though the widths fit the layout",
           "steps/search.py",
           (("    if fmt != \"hf\" or measured.step % decilm.WIDTH_MULTIPLE:\n",
             "    if True:\n"),),
           (DECI + "test_a_search_for_hf_may_remove_attention_when_the_widths_fit",)),
    Mutant("router-bias-rows-kept",
           "a removed expert's score-correction bias stays in a sigmoid router (GLM-4.5)",
           "models/expert_pruning.py",
           (("                         *router.named_buffers(recurse=False)]:\n", "]:\n"),),
           ("tests/test_expert_pruning.py::test_removing_experts_equals_the_model_with_their_"
            "router_logits_at_minus_infinity[glm4_moe]",)),
    Mutant("grouped-router-accepted",
           "experts removed from a router that picks them group by group",
           "models/expert_pruning.py",
           (("    if groups > 1:\n", "    if False:\n"),),
           ("tests/test_expert_pruning.py::test_a_router_that_picks_by_group_is_refused_in_one_"
            "line",)),
    Mutant("latent-attention-left-dense",
           "DeepSeek's latent attention projections are not pruned (no role)",
           "models/adapters.py",
           (('        latent = dict.fromkeys(self.latent, "attention.latent")\n',
             "        latent = {}\n"),),
           ("tests/test_moe.py::test_whole_layouts_dense_blocks_first_then_experts_prune_and_"
            "reload[deepseek_v2_lite]",)),
    Mutant("llama3-rope-factors-unwritten",
           "a Llama 3.x model's GGUF without its rope scaling factors",
           "export/gguf.py",
           (('    if rope_kind(config) == "llama3":  # llama.cpp divides',
             '    if False:  # llama.cpp divides'),),
           ("tests/test_export.py::test_a_llama3_rope_model_runs_in_llama_cpp_like_the_model_in_"
            "memory",)),
    Mutant("llama3-rope-interpolation-inverted",
           "the interpolated band's factor is its reciprocal",
           "models/rope.py",
           (("            out.append(1 / ((1 - smooth) / factor + smooth))\n",
             "            out.append((1 - smooth) / factor + smooth)\n"),),
           ("tests/test_export.py::test_llama3_rope_factors_are_transformers_own_frequencies",)),
    Mutant("size-target-ignores-rope-factors",
           "a size target leaves the Llama 3.x rope factors' bytes to the chosen tensors",
           "models/allocation.py",
           (("    total = metadata + rope_tensor_bytes(model.config, "
             "head_geometry(model.config).head_dim)\n",
             "    total = metadata\n"),),
           ("tests/test_mixes.py::test_a_size_target_counts_the_rope_factors_the_file_holds",)),
    Mutant("embedding-type-ignored",
           "--embedding-type is not applied: the embedding and output matrix stay at q8_0",
           "models/quantize.py",
           (("        if embedding and settings.embedding_type is not None:\n",
             "        if False:\n"),),
           ("tests/test_search.py::test_a_structures_cost_is_its_cut_model_and_its_gguf_file"
            "[structure2-iq4_nl]",)),
    Mutant("search-counts-embedding-at-q8_0",
           "the structure search counts the embedding at q8_0 whatever type it will be written in",
           "models/structure_budget.py",
           (("                   embedding if scheme is not None else None, metadata)",
             "                   \"q8_0\" if scheme is not None else None, metadata)"),),
           ("tests/test_search.py::test_a_structures_cost_is_its_cut_model_and_its_gguf_file"
            "[structure3-q4_0]",)),
    Mutant("recover-summary-single-batch-loss",
           "the recovery summary's loss is one batch's at each end again",
           "steps/recover.py",
           (("    span = max(1, len(curve) // 10)\n", "    span = 1\n"),),
           ("tests/test_recovery.py::test_the_summary_loss_is_the_mean_of_the_first_and_last_"
            "tenth_of_the_steps",)),
    Mutant("tied-output-saved-twice",
           "a tied output matrix converted to the saved dtype is stored as a copy of its own",
           "export/hf.py",
           (("            for k, v in state.items() if k not in tied}\n",
             "            for k, v in state.items()}\n"),),
           ("tests/test_saved_dtype.py::test_a_tied_output_matrix_is_saved_once_in_the_sources_"
            "dtype",)),
    Mutant("oss-fold-concatenated",
           "gpt-oss's experts folded back with gate and up concatenated, not interleaved",
           "models/experts.py",
           (("                return torch.stack((gate, up), dim=-1).flatten(-2)\n",
             "                return torch.cat((gate, up), dim=-1)\n"),),
           ("tests/test_moe.py::test_gpt_oss_prunes_removes_experts_and_reloads_with_the_same_"
            "logits",)),
    Mutant("compressed-fused-experts-accepted",
           "compressed-tensors written per expert for a family whose checkpoints keep them fused",
           "export/compressed.py",
           (("    if moe is not None and moe.stored_fused:\n", "    if False:\n"),),
           ("tests/test_moe.py::test_gpt_oss_prunes_removes_experts_and_reloads_with_the_same_"
            "logits",)),
    Mutant("decilm-any-llama-family",
           "the Nemotron-NAS layout takes any LLaMA-family model (Qwen2's biases dropped)",
           "models/decilm.py",
           (("    if not plain:\n", "    if False:\n"),),
           (DECI + "test_a_family_whose_blocks_are_not_llamas_is_refused_before_any_work",)),
    Mutant("compressed-differing-blocks-accepted",
           "a model whose blocks differ in shape written as compressed-tensors' one config",
           "export/compressed.py",
           (("    if differing_blocks(model) is not None:\n", "    if False:\n"),),
           (DECI + "test_steps_that_need_blocks_of_one_shape_refuse_a_reloaded_one",)),
    Mutant("depth-ignores-the-jobs-width-cut",
           "attention removed for hf with a width cut off the layout's grid in the same job",
           "steps/depth.py",
           (("                multiple_of=shrink.multiple_of if shrink and shrink.mlp else None)",
             "                multiple_of=None)"),),
           (DECI + "test_a_width_cut_in_the_same_job_must_fit_the_layout_too",)),
    Mutant("search-head-cost-in-every-kept-block",
           "a head cut counted in every kept block, also those without attention",
           "models/structure_budget.py",
           (("                - self.head * (structure.heads * self.groups * attended))",
             "                - self.head * (structure.heads * self.groups * kept))"),),
           (SEARCH + "test_a_head_cut_costs_what_its_cut_model_and_file_hold",)),
    Mutant("shrink-heads-of-attention-free-blocks",
           "shrink cuts heads out of blocks whose attention prune-depth removed",
           "models/shrink.py",
           (("        if plan.heads_at(index) < plan.heads_old and not attention_free(block):\n",
             "        if plan.heads_at(index) < plan.heads_old:\n"),),
           (SEARCH + "test_a_head_cut_costs_what_its_cut_model_and_file_hold",)),
    Mutant("search-head-cut-per-group-ignored",
           "the search's head cut is passed to shrink as a count, not a share of the group",
           "steps/search.py",
           (("                                    heads=structure.heads / measured.per_group,",
             "                                    heads=structure.heads / 4,"),),
           (SEARCH + "test_a_search_with_heads_tries_head_cuts_and_reports_them",)),
    Mutant("recovery-resume-without-optimizer",
           "a resumed recovery starts with a fresh optimiser state",
           "recovery.py",
           (('    optimizer.load_state_dict(saved["optimizer"])\n', ""),),
           (RECOVERY + "test_recover_command_report_and_a_killed_run_resumes_exactly",)),
    Mutant("recovery-overlap-unchecked",
           "training text that overlaps the evaluation windows is accepted",
           "steps/recover.py",
           (("        if shared:\n", "        if False:\n"),),
           (RECOVERY + "test_recover_refusals_write_nothing",)),
)


def make_copy(mutant: Mutant, where: Path) -> Path:
    package = where / "snapprune"
    shutil.copytree(SOURCE, package, ignore=shutil.ignore_patterns("__pycache__"))
    path = package / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            raise SystemExit(f"mutant {mutant.name}: expected the text once in {mutant.file}, "
                             f"found it {count} times: {old!r}")
        text = text.replace(old, new)
    path.write_text(text)
    return package


def run_tests(mutant: Mutant | None, threads: int,
              tests: tuple[str, ...] = ()) -> tuple[str, float, str]:
    """Run the mutant's tests on a mutated copy (or ``tests`` on the clean source); return
    the verdict."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="snapprune-mutant-") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        if mutant is not None:
            package = make_copy(mutant, Path(tmp))
            env["PYTHONPATH"] = os.pathsep.join([tmp, env.get("PYTHONPATH", "")])
            where = subprocess.run(
                [sys.executable, "-c", "import snapprune; print(snapprune.__file__)"],
                env=env, capture_output=True, text=True, cwd=ROOT)
            if not where.stdout.strip().startswith(str(package)):
                raise SystemExit(f"mutant {mutant.name}: the copy is not what gets imported "
                                 f"({where.stdout.strip() or where.stderr.strip()})")
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
             "-p", "no:randomly", *(mutant.tests if mutant is not None else tests)],
            env=env, capture_output=True, text=True, cwd=ROOT)
    if mutant is None:
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
        return ("passed" if proc.returncode == 0 else "failed", time.perf_counter() - start,
                lines[0] if lines else "")
    verdict, first = _verdict(mutant, proc.returncode, proc.stdout + proc.stderr)
    return verdict, time.perf_counter() - start, first


def _preload() -> None:
    """The libraries every mutant's tests import, imported once before forking (never
    snapprune, which each child imports from its own copy)."""
    import gguf  # noqa: F401
    import hypothesis  # noqa: F401
    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from transformers import (  # noqa: F401
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    assert "snapprune" not in sys.modules, "the parent must not import snapprune"


def _child(mutant: Mutant, where: Path, log: Path) -> int:
    """In the forked child: the mutant's copy first on the path (here and for any process its
    tests start), its tests in-process; the exit status is pytest's."""
    import pytest
    import torch

    handle = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(handle, 1)
    os.dup2(handle, 2)
    package = make_copy(mutant, where)
    os.chdir(ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(where), os.environ.get("PYTHONPATH", "")])
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    sys.path.insert(0, str(where))
    import snapprune

    if not snapprune.__file__.startswith(str(package)):
        print(f"the copy is not what gets imported ({snapprune.__file__})")
        return 3
    return int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                            *mutant.tests]))


def run_forked(chosen: list[Mutant], jobs: int):
    """Yield ``(mutant, verdict, seconds, first failure)`` as the forked children finish,
    ``jobs`` at a time; one thread, so the fork copies no other thread's held lock."""
    _preload()
    waiting, running = list(chosen), {}
    with tempfile.TemporaryDirectory(prefix="snapprune-mutants-") as tmp:
        while waiting or running:
            while waiting and len(running) < jobs:
                mutant = waiting.pop(0)
                where = Path(tmp) / mutant.name
                where.mkdir()
                log = Path(tmp) / f"{mutant.name}.log"
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    code = 70
                    try:
                        code = _child(mutant, where, log)
                    except BaseException as exc:
                        print(f"the child failed before its tests: {exc}", flush=True)
                    finally:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        os._exit(code)
                running[pid] = (mutant, log, time.perf_counter())
            pid, status = os.wait()
            mutant, log, start = running.pop(pid)
            text = log.read_text(errors="replace") if log.is_file() else ""
            try:
                verdict, first = _verdict(mutant, os.waitstatus_to_exitcode(status), text)
            except SystemExit:
                for other in running:  # no child outlives the check
                    os.kill(other, 9)
                    os.waitpid(other, 0)
                raise
            yield mutant, verdict, time.perf_counter() - start, first


def _verdict(mutant: Mutant, code: int, text: str) -> tuple[str, str]:
    """``(passed | failed, the first failing test)`` from pytest's exit status and output. A
    kill is a test that failed (exit 1) or a module that no longer imports (exit 2 with a
    collection error); anything else — a test id that names nothing (exit 4), no test
    collected (5), a child that died — stops the check: it would count as a kill that no test
    made."""
    if code == 0:
        return "passed", ""
    failed = [ln for ln in text.splitlines() if ln.startswith("FAILED ")]
    broken = [ln for ln in text.splitlines() if ln.startswith("ERROR tests/")]
    if code == 1 and (failed or broken):
        return "failed", (failed or broken)[0]
    if code == 2 and broken:
        return "failed", broken[0]
    tail = " | ".join(text.strip().splitlines()[-3:])
    raise SystemExit(f"mutant {mutant.name}: its tests exited {code} without a failing test "
                     f"({tail or 'no output'}); check its test ids and edits")


def run_spawned(chosen: list[Mutant], jobs: int):
    """Yield ``(mutant, verdict, seconds, first failure)``, each mutant in a fresh
    interpreter."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [(m, pool.submit(run_tests, m, 1)) for m in chosen]
        for mutant, future in futures:
            yield (mutant, *future.result())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=None, help="mutant names to run")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--no-fork", action="store_true",
                        help="each mutant in a fresh interpreter (slower; the default where "
                             "the system cannot fork)")
    parser.add_argument("--clean-passed", action="store_true",
                        help="the whole suite has just passed on the clean source (CI runs it "
                             "first): skip running the mutants' tests on it again")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]

    if not args.clean_passed:
        suites = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        baseline, seconds, first = run_tests(None, 1, suites)
        print(f"clean source: tests {baseline} in {seconds:.0f}s", flush=True)
        if baseline != "passed":
            print(f"the mutants' tests fail on the clean source ({first}); fix that first")
            return 2
    survived = []
    forked = hasattr(os, "fork") and not args.no_fork
    for mutant, verdict, seconds, first in (run_forked if forked else run_spawned)(
            chosen, max(1, args.jobs)):
        state = "killed" if verdict == "failed" else "SURVIVED"
        if state == "SURVIVED":
            survived.append(mutant.name)
        caught = f" by {first.split('::')[-1][:70]}" if first else ""
        print(f"{state:8s} {mutant.name:38s} {seconds:5.0f}s  {mutant.why}{caught}",
              flush=True)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed"
          + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
