"""GPTQ against round-to-nearest on real SmolLM2-135M layers: each layer's relative output
error ``‖X(W − Q)ᵀ‖² / ‖XWᵀ‖²`` on its own calibration inputs (8 × 512 tokens of the bundled C4
sample, captured from the dense model), for a few grids.

    python benchmarks/gptq_layers.py
"""

from __future__ import annotations

import torch

import snapprune
from snapprune.data import calibration_windows
from snapprune.engine.gptq import round_to_nearest
from snapprune.engine.schemes import parse_scheme
from snapprune.models.loading import load_model

LAYERS = ("model.layers.3.self_attn.q_proj", "model.layers.3.mlp.down_proj",
          "model.layers.10.mlp.gate_proj")
SCHEMES = ("q4_0", "w4g128", "w3g128")


def relative_error(x: torch.Tensor, weight: torch.Tensor, values: torch.Tensor) -> float:
    x, weight, values = x.double(), weight.double(), values.double()
    return float(((x @ (weight - values).T) ** 2).sum() / ((x @ weight.T) ** 2).sum())


def main() -> int:
    model, tokenizer, _ = load_model("smollm2-135m", progress=False)
    windows = calibration_windows("c4-sample", tokenizer, nsamples=8, seqlen=512, seed=0)
    modules = dict(model.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in LAYERS}
    hooks = [modules[name].register_forward_hook(
        lambda _m, args, _out, name=name: inputs[name].append(
            args[0].detach().reshape(-1, args[0].shape[-1]))) for name in LAYERS]
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for hook in hooks:
        hook.remove()
    print("| layer | scheme | GPTQ | RTN |\n|---|---|--:|--:|")
    for name in LAYERS:
        x = torch.cat(inputs[name])
        weight = modules[name].weight.detach().float()
        stats = snapprune.LayerStats(columns=weight.shape[1])
        stats.add(x)
        for scheme in SCHEMES:
            gptq = snapprune.quantize_weight(weight.clone(), stats, scheme).weight
            rtn = round_to_nearest(weight.clone(), parse_scheme(scheme), torch.float16)[0]
            print(f"| {name} | {scheme} | {relative_error(x, weight, gptq):.5f} | "
                  f"{relative_error(x, weight, rtn):.5f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
