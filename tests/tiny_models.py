"""Tiny random networks of the real architectures, saved where the engine looks for weights.

Random weights do for what does not depend on them: shapes, memory, speed, the cache, queues.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.ESRGAN import ESRGAN

from server.engine.models import LoadedModel, load_model
from server.engine.weights import MANIFEST


def tiny_network(weight_id: str) -> torch.nn.Module:
    """A few-channel network of the weight's architecture and network scale, with seeded random weights."""
    weight = MANIFEST[weight_id]
    torch.manual_seed(sum(map(ord, weight_id)))
    if weight.architecture == "Compact":
        return Compact(num_feat=4, num_conv=1, upscale=weight.network_scale)
    if weight.architecture == "ESRGAN":
        return ESRGAN(num_filters=4, num_blocks=1, scale=weight.network_scale)
    raise ValueError(f"no tiny {weight.architecture}")


def write_tiny_weights(directory: Path, *weight_ids: str) -> Path:
    """Save tiny networks as the converted files of `weight_ids` (all Real-ESRGAN ones by default)."""
    directory.mkdir(parents=True, exist_ok=True)
    for weight_id in weight_ids or tuple(w for w in MANIFEST if MANIFEST[w].ncnn_stem):
        path = MANIFEST[weight_id].converted_path(directory)
        assert path is not None
        save_file(tiny_network(weight_id).state_dict(), str(path))
    return directory


def tiny_model(directory: Path, weight_id: str = "realesr-animevideov3-x4") -> LoadedModel:
    """A tiny network loaded on the CPU the way the engine loads real ones."""
    write_tiny_weights(directory, weight_id)
    return load_model(weight_id, directory, torch.device("cpu"))
