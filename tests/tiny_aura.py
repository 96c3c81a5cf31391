"""An AuraSR at a reduced configuration: fal's architecture with tiny dims and depths, random weights.

It keeps every trait spandrel reads the configuration from (its key names, 8 attention heads, the
style network's 4:1 width ratio that gives the scale, two conv kernels per modulated conv, full
attention in the two deepest up-levels), so spandrel detects it as AuraSR x4 and rebuilds it from
the tensor shapes alone, and the engine runs it exactly as it runs the 618 M-parameter original.
A 64-px window takes about a tenth of a second on one CPU core.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from spandrel.architectures.AuraSR import AuraSR

from server.engine.weights import MANIFEST


def tiny_aura_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights, with the output layer scaled so that the output is mid-grey texture, not clipped."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        network = AuraSR(
            dim=4, image_size=None, input_image_size=None,
            style_network={"dim_in": 8, "dim_out": 32, "depth": 1},
            up_dim_mults=(1, 1, 2, 2, 4), down_dim_mults=(2, 2, 4),
            full_attn=(False, False, False, True, True), self_attn_dim_head=4, self_attn_heads=8,
            attn_depths=(2, 2, 2, 1, 1), mid_attn_depth=1, num_conv_kernels=2, skip_connect_scale=0.4,
        ).eval()
        probe = torch.rand(4, 3, 64, 64)
        with torch.inference_mode():
            features = network(probe, noise=torch.randn(4, 8)) - network.final_to_rgb.bias.view(1, 3, 1, 1)
    finally:
        torch.random.set_rng_state(generator_state)
    state = {key: tensor.clone() for key, tensor in network.state_dict().items()}
    gain = 0.12 / features.std().item()
    state["final_to_rgb.weight"] *= gain
    state["final_to_rgb.bias"] = 0.5 - gain * features.mean(dim=(0, 2, 3))
    return state


def write_tiny_aura(weights_dir: Path, seed: int = 0) -> Path:
    """Save the reduced AuraSR where the manifest's official AuraSR file goes; return its path."""
    path = MANIFEST["aura-sr"].official_path(weights_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_aura_state_dict(seed), str(path))
    return path
