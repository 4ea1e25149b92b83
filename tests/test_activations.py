"""Where calibration activations live (``--activations``): a speed and memory choice that must
never change a result, never write the caller's tensors, and leave every module where it was."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model, token_batch

from snapprune.errors import SnapPruneError
from snapprune.models.adapters import adapter_for
from snapprune.models.capture import AUTO_DEVICE_SHARE, activation_home, capture_block_inputs
from snapprune.models.prune import prune_model
from snapprune.models.settings import PruneSettings

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_home_follows_the_request():
    cuda = torch.device("cuda", 0)
    assert activation_home("cpu", cuda, 1) == CPU
    assert activation_home("device", cuda, 10**15) == cuda  # asked for: no second-guessing
    for place in ("auto", "device", "cpu"):
        assert activation_home(place, CPU, 10**15) == CPU
    with pytest.raises(SnapPruneError, match="unknown activation placement 'gpu'"):
        activation_home("gpu", cuda, 1)


def test_auto_keeps_them_on_the_device_only_when_they_fit(monkeypatch):
    free = 8 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _device=None: (free, 2 * free))
    cuda = torch.device("cuda", 0)
    limit = int(AUTO_DEVICE_SHARE * free)
    assert activation_home("auto", cuda, limit) == cuda
    assert activation_home("auto", cuda, limit + 1) == CPU


@pytest.mark.parametrize("method", ["thanos", "wanda"])
def test_placement_never_changes_the_weights(method):
    ids = token_batch(5, 16)
    weights = {}
    for place in ("cpu", "device", "auto"):
        model = tiny_model("llama")
        run = prune_model(model, ids, PruneSettings(method, "unstructured", 0.5), progress=False,
                          batch_size=2, activations=place)
        assert run.activations == "cpu"
        weights[place] = {k: v.clone() for k, v in model.state_dict().items()}
    for place in ("device", "auto"):
        for name, tensor in weights["cpu"].items():
            assert torch.equal(tensor, weights[place][name]), (place, name)


def test_unknown_placement_is_refused_before_any_work():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SnapPruneError, match="use auto, device, cpu"):
        prune_model(model, token_batch(2, 8), PruneSettings("wanda", "unstructured", 0.5),
                    progress=False, activations="disk")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _masks_and_errors(device: str, activations: str):
    model = tiny_model("llama")
    ids = token_batch(6, 32)
    blocks = adapter_for(model).decoder_blocks(model)
    inputs = capture_block_inputs(model, blocks, ids, torch.device(device), batch_size=4)
    kept = [x.clone() for x in inputs.batches]
    run = prune_model(model, None, PruneSettings("thanos", "unstructured", 0.5), device=device,
                      progress=False, batch_size=4, block_inputs=inputs,
                      activations=activations)
    # The caller's activations are unchanged (pinned copies are the loop's own) ...
    assert all(torch.equal(a, b) for a, b in zip(inputs.batches, kept, strict=True))
    # ... and every module is back on the CPU.
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    masks = {name: module.weight == 0 for name, module in model.named_modules()
             if name in {r.name for r in run.layers}}
    return run, masks, {r.name: r.error for r in run.layers}


@needs_cuda
@pytest.mark.parametrize("activations", ["device", "cpu"])
def test_cuda_equals_cpu(activations):
    """On a GPU, with activations kept there or on pinned host memory: the same masks (≥ 99.99%
    of entries: round-off may flip a near-tie) and the same layer errors (1e-3 relative)."""
    _, cpu_masks, cpu_errors = _masks_and_errors("cpu", "cpu")
    run, masks, errors = _masks_and_errors("cuda", activations)
    assert run.activations == ("cpu" if activations == "cpu" else "cuda")
    equal = sum(int((masks[n] == cpu_masks[n]).sum()) for n in masks)
    total = sum(m.numel() for m in masks.values())
    assert equal / total >= 0.9999
    for name, error in errors.items():
        assert error == pytest.approx(cpu_errors[name], rel=1e-3)


def test_layer_errors_can_be_skipped_without_changing_the_weights():
    ids = token_batch(4, 16)
    settings = PruneSettings("thanos", "2:4")
    measured, skipped = tiny_model("llama"), tiny_model("llama")
    with_errors = prune_model(measured, ids, settings, progress=False)
    without = prune_model(skipped, ids, settings, progress=False, layer_errors=False)
    assert all(r.error > 0 for r in with_errors.layers)
    assert all(r.error != r.error for r in without.layers)  # NaN: not measured
    assert not without.layer_errors
    for name, tensor in measured.state_dict().items():
        assert torch.equal(tensor, skipped.state_dict()[name]), name


def test_wanda_without_layer_errors_needs_no_hessian(monkeypatch):
    """Wanda reads input norms only: without layer errors no Hessian is gathered at all, and the
    weights are those of a run that gathered it."""
    from snapprune.engine import stats as stats_module

    made = []
    original = stats_module.LayerStats.__init__

    def spy(self, columns, **kwargs):
        made.append(kwargs.get("hessian", True))
        original(self, columns, **kwargs)

    ids = token_batch(4, 16)
    settings = PruneSettings("wanda", "unstructured", 0.5)
    reference = tiny_model("llama")
    prune_model(reference, ids, settings, progress=False)
    monkeypatch.setattr(stats_module.LayerStats, "__init__", spy)
    lean = tiny_model("llama")
    prune_model(lean, ids, settings, progress=False, layer_errors=False)
    assert made and not any(made)
    made.clear()
    prune_model(tiny_model("llama"), ids, PruneSettings("thanos", "unstructured", 0.5),
                progress=False, layer_errors=False)
    assert made and all(made)  # Thanos always needs it
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, lean.state_dict()[name]), name


def test_hessian_free_statistics_are_refused_where_the_hessian_is_needed():
    from snapprune import LayerStats, prune_weight

    stats = LayerStats(8, hessian=False)
    stats.add(torch.randn(32, 8))
    weight = torch.randn(4, 8)
    assert prune_weight(weight, stats, method="wanda", sparsity=0.5).mask.sum() == 16
    with pytest.raises(SnapPruneError, match="needs the Hessian"):
        prune_weight(weight, stats, method="thanos", sparsity=0.5)
    with pytest.raises(SnapPruneError, match="without the Hessian"):
        _ = stats.hessian
