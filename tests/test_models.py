"""Whole-model pipeline on tiny random models of every family."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import FAMILIES, LAYERS, tiny_model, token_batch

from snapprune import SnapPruneError, linear_weight
from snapprune.models import adapter_for
from snapprune.models.blockloop import block_output
from snapprune.models.capture import capture_block_inputs
from snapprune.models.prune import prune_model
from snapprune.models.targets import target_layers

EXPECTED_FAMILY = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "opt": "opt",
                   "gpt2": "gpt2", "gpt_neox": "gpt_neox", "phi3": "phi3", "phi": "generic"}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_blocks(family):
    model = tiny_model(family)
    adapter = adapter_for(model)
    assert adapter.family == EXPECTED_FAMILY[family]
    assert len(adapter.decoder_blocks(model)) == LAYERS


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_captured_inputs_reproduce_the_forward_pass(family):
    """Blocks rerun on captured inputs and keyword arguments give the model's hidden states."""
    model = tiny_model(family)
    ids = token_batch(3, 24)
    blocks = adapter_for(model).decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), batch_size=2)
    assert len(inputs.batches) == 2 and inputs.batches[0].shape[0] == 2
    hidden = model(ids, output_hidden_states=True).hidden_states
    for batch in range(2):
        rows = slice(2 * batch, 2 * batch + 2)
        x = inputs.batches[batch]
        torch.testing.assert_close(x, hidden[0][rows])
        for k in range(LAYERS - 1):  # the last entry is after the final norm
            x = block_output(inputs.run(blocks[k], x))
            torch.testing.assert_close(x, hidden[k + 1][rows], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_to_exact_sparsity(family):
    model = tiny_model(family)
    ids = token_batch(4, 32)
    dense_logits = model(ids[:1]).logits
    run = prune_model(model, ids, method="thanos", sparsity=0.5, blocksize=32, progress=False)
    layers = target_layers(model)
    assert len(run.layers) == sum(len(v) for v in layers.values()) > 0
    for named in layers.values():
        for name, module in named.items():
            w = linear_weight(module)
            assert (w == 0).sum().item() == w.numel() // 2, name
    logits = model(ids[:1]).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits)
    assert all(r.error >= 0 for r in run.layers)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "thanos"])
@pytest.mark.parametrize("pattern,sparsity,alpha", [("unstructured", 0.6, 0.0),
                                                    ("2:4", None, 0.0), ("4:8", None, 0.0),
                                                    ("structured", 0.3, 0.0),
                                                    ("structured", 0.3, 0.125)])
def test_every_method_and_pattern_on_a_tiny_llama(method, pattern, sparsity, alpha):
    model = tiny_model("llama")
    run = prune_model(model, token_batch(4, 32), method=method, pattern=pattern,
                      sparsity=sparsity, alpha=alpha, blocksize=32, progress=False)
    for named in target_layers(model).values():
        for name, module in named.items():
            w = linear_weight(module)
            rows, cols = w.shape
            zero = w == 0
            if pattern == "unstructured":
                assert zero.sum().item() == int(0.6 * rows * cols), name
            elif ":" in pattern:
                n, m = (int(v) for v in pattern.split(":"))
                assert (zero.reshape(rows, -1, m).sum(2) == n).all(), name
            else:
                dense_rows = ~zero.any(1)
                assert dense_rows.sum().item() == int(alpha * rows), name
                assert torch.equal(zero[~dense_rows], zero[~dense_rows][:1].expand(
                    int((~dense_rows).sum()), cols)), name
    assert run.achieved_sparsity == pytest.approx(0.6 if pattern == "unstructured" else
                                                  0.5 if ":" in pattern else 0.3, abs=0.03)


def test_same_seed_same_weights():
    a, b = tiny_model("qwen2"), tiny_model("qwen2")
    for model in (a, b):
        prune_model(model, token_batch(4, 32, seed=3), method="thanos", sparsity=0.5,
                    progress=False)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name


def test_include_and_exclude():
    model = tiny_model("llama")
    run = prune_model(model, token_batch(2, 16), method="wanda", sparsity=0.5,
                      include=("mlp",), exclude=("down_proj",), progress=False)
    names = {r.name.split(".", 3)[-1] for r in run.layers}
    assert names == {"mlp.gate_proj", "mlp.up_proj"}
    assert (linear_weight(model.model.layers[0].self_attn.q_proj) != 0).all()
    with pytest.raises(SnapPruneError, match="no linear layer matches"):
        prune_model(model, token_batch(2, 16), method="wanda", sparsity=0.5,
                    include=("nothing_like_this",), progress=False)


def test_bad_requests_fail_before_any_change():
    model = tiny_model("opt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SnapPruneError, match="divisible by 5"):
        prune_model(model, token_batch(2, 16), method="thanos", pattern="2:5", progress=False)
    model.model.decoder.layers[2].fc1.weight.data[0, 0] = float("nan")
    with pytest.raises(SnapPruneError, match="NaN or Inf"):
        prune_model(model, token_batch(2, 16), method="thanos", sparsity=0.5, progress=False)
    model.model.decoder.layers[2].fc1.weight.data[0, 0] = before[
        "model.decoder.layers.2.fc1.weight"][0, 0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_run_report_numbers():
    model = tiny_model("gpt2")
    # The peak is in bytes, not the kilobytes getrusage reports: about the resident size before
    # the run or more (1024× too small otherwise; the kernel's two RSS counters differ by a few
    # hundred kilobytes, hence the margin).
    with open("/proc/self/statm") as handle:
        resident = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    run = prune_model(model, token_batch(2, 16), method="sparsegpt", pattern="2:4",
                      progress=False)
    assert run.calibration_seconds > 0 and run.solver_seconds > 0
    assert run.total_seconds >= run.solver_seconds
    assert run.peak_memory_bytes >= 0.9 * resident
    assert run.achieved_sparsity == pytest.approx(0.5)


def test_layers_with_the_same_input_share_exact_statistics():
    from snapprune.models.blockloop import gather_layer_stats

    model = tiny_model("llama")
    ids = token_batch(3, 16)
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks, ids, torch.device("cpu"), batch_size=2)
    named = target_layers(model)[0]
    stats = gather_layer_stats(blocks[0], named, inputs, torch.device("cpu"))
    prefix = "model.layers.0."
    assert stats[prefix + "self_attn.q_proj"] is stats[prefix + "self_attn.v_proj"]
    assert stats[prefix + "mlp.gate_proj"] is stats[prefix + "mlp.up_proj"]
    assert stats[prefix + "self_attn.o_proj"] is not stats[prefix + "self_attn.q_proj"]
    captured = {}
    handles = [m.register_forward_hook(lambda _m, i, _o, n=n: captured.setdefault(n, []).append(
        i[0].reshape(-1, i[0].shape[-1]))) for n, m in named.items()]
    with torch.no_grad():
        for x in inputs.batches:
            inputs.run(blocks[0], x)
    for h in handles:
        h.remove()
    for name, xs in captured.items():
        x = torch.cat(xs)
        torch.testing.assert_close(stats[name].hessian, 2 * x.T @ x / x.shape[0])
        assert stats[name].nsamples == 3 * 16


def test_batching_changes_speed_not_results():
    a, b = tiny_model("mistral"), tiny_model("mistral")
    ids = token_batch(5, 32, seed=4)
    prune_model(a, ids, method="thanos", pattern="2:4", batch_size=1, progress=False)
    prune_model(b, ids, method="thanos", pattern="2:4", batch_size=4, progress=False)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5, msg=name)
