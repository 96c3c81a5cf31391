"""OpenVINO as the CPU backend of the networks that run fp32 there: CPUs without native bf16.

Measured on 2 EPYC cores (docs/benchmarks.md, `scripts/bench_backends.py`): OpenVINO f32 runs x4plus and
animevideov3 1.23–1.25× faster than torch fp32 channels_last, at the same output (90 and 98 dB). In bf16 it
gains 1.02–1.17× over torch's bf16 channels_last, too little for its conversion, so bf16 stays on torch.

A weight file is converted once, off the request path, with a dynamic input shape (every tile size runs on
one model), and kept as OpenVINO IR under the data dir, named by the file's digest; a restart only compiles
it, in about a second. The package is optional: without it the CPU runs torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from server.engine.models import CompiledForward, LoadedModel
from server.engine.precision import Execution

_EXAMPLE_SIDE = 64


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def wanted(device: torch.device, execution: Execution) -> bool:
    """OpenVINO runs what the CPU runs in fp32, where it is faster than torch."""
    return available() and device.type == "cpu" and execution.dtype == torch.float32


def ir_path(weights_file: Path, cache_dir: Path) -> Path:
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:16]
    return cache_dir / f"{weights_file.stem}-{digest}.xml"


def prepare(model: LoadedModel, weights_file: Path, cache_dir: Path) -> CompiledForward:
    """An OpenVINO forward pass for `model`: converted and saved on the first call for its weights, then compiled."""
    import openvino as ov

    path = ir_path(weights_file, cache_dir)
    if not path.exists():
        _convert(model, path)
    core = ov.Core()
    compiled = core.compile_model(core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()  # used by the device worker's thread alone

    def forward(batch: torch.Tensor) -> torch.Tensor:
        request.infer({0: np.ascontiguousarray(batch.float().numpy())})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return CompiledForward(None, forward, "openvino")


def _convert(model: LoadedModel, path: Path) -> None:
    """Convert with a dynamic shape and save, weights kept in f32, the .bin before the .xml that names it."""
    import openvino as ov

    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(1, 3, _EXAMPLE_SIDE, _EXAMPLE_SIDE)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracing warns about the networks' data-dependent padding
        converted = ov.convert_model(model.descriptor.model, example_input=example,
                                     input=[ov.PartialShape([-1, 3, -1, -1])])
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        draft = Path(scratch) / path.name
        ov.save_model(converted, draft, compress_to_fp16=False)
        os.replace(draft.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(draft, path)
