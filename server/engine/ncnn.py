"""Reading ncnn `.param`/`.bin` model pairs into PyTorch state dicts that spandrel loads.

Only what the Real-ESRGAN models use is understood: `Convolution` (fp16-tagged or fp32
weights, raw fp32 bias), `PReLU` (raw fp32 slopes) and a few layers without weights.
The `.bin` holds the weighted layers in `.param` order and nothing else, so a conversion
must consume it exactly; anything left over or missing means the graph was misread.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

PARAM_MAGIC = "7767517"

# The 4-byte tag ncnn writes before a weight blob, telling how it is stored.
_TAG_FLOAT16 = 0x01306B47
_TAG_FLOAT32 = 0x0002C056
_TAG_RAW_FLOAT32 = 0  # four zero bytes: plain float32 follows

# Layer types that carry nothing in the .bin (those the Real-ESRGAN graphs use).
_WEIGHTLESS = frozenset({"Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "PixelShuffle", "ReLU"})


class NcnnFormatError(ValueError):
    """The .param/.bin pair is not a model this converter understands."""


@dataclass(frozen=True)
class Layer:
    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, str] = field(default_factory=dict)

    def int_param(self, key: int, default: int = 0) -> int:
        return int(self.params.get(key, default))


@dataclass(frozen=True)
class WeightedLayer:
    """One layer's tensors, read from the .bin: `weight`, plus `bias` for a convolution that has one."""

    layer: Layer
    tensors: dict[str, torch.Tensor]


def parse_param(text: str) -> list[Layer]:
    """The layers of a text `.param` file, in file order."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].strip() != PARAM_MAGIC:
        raise NcnnFormatError(f"not a text ncnn .param file (first line is not {PARAM_MAGIC})")
    layer_count, _blob_count = (int(value) for value in lines[1].split())
    layers = [_parse_layer(line) for line in lines[2:]]
    if len(layers) != layer_count:
        raise NcnnFormatError(f".param declares {layer_count} layers but lists {len(layers)}")
    return layers


def _parse_layer(line: str) -> Layer:
    fields = line.split()
    layer_type, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
    inputs = tuple(fields[4 : 4 + n_in])
    outputs = tuple(fields[4 + n_in : 4 + n_in + n_out])
    params: dict[int, str] = {}
    for item in fields[4 + n_in + n_out :]:
        key, _, value = item.partition("=")
        params[int(key)] = value
    return Layer(layer_type, name, inputs, outputs, params)


def read_weights(layers: list[Layer], data: bytes) -> list[WeightedLayer]:
    """Read each weighted layer's tensors from `.bin` bytes; the bytes must be used up exactly."""
    reader = _BinReader(data)
    weighted: list[WeightedLayer] = []
    for layer in layers:
        if layer.type == "Convolution":
            weighted.append(WeightedLayer(layer, _read_convolution(layer, reader)))
        elif layer.type == "PReLU":
            slopes = reader.float32(layer.int_param(0, 1))
            weighted.append(WeightedLayer(layer, {"weight": slopes}))
        elif layer.type not in _WEIGHTLESS:
            raise NcnnFormatError(f"layer {layer.name}: {layer.type} is not supported")
    if reader.remaining:
        raise NcnnFormatError(f".bin has {reader.remaining} bytes left after the last weighted layer")
    return weighted


def _read_convolution(layer: Layer, reader: _BinReader) -> dict[str, torch.Tensor]:
    out_channels = layer.int_param(0)
    kernel_w = layer.int_param(1)
    kernel_h = layer.int_param(11, kernel_w)
    weight_count = layer.int_param(6)
    if layer.int_param(7, 1) != 1:
        raise NcnnFormatError(f"layer {layer.name}: grouped convolution is not supported")
    in_channels, rest = divmod(weight_count, out_channels * kernel_h * kernel_w)
    if rest or in_channels == 0:
        raise NcnnFormatError(f"layer {layer.name}: weight count {weight_count} does not fit its shape")
    tensors = {"weight": reader.tagged(weight_count).reshape(out_channels, in_channels, kernel_h, kernel_w)}
    if layer.int_param(5):
        tensors["bias"] = reader.float32(out_channels)
    return tensors


class _BinReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def _take(self, size: int) -> bytes:
        if size > self.remaining:
            raise NcnnFormatError(f".bin ends early: {size} bytes wanted at offset {self._offset}")
        chunk = self._data[self._offset : self._offset + size]
        self._offset += size
        return chunk

    def float32(self, count: int) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(self._take(4 * count), dtype="<f4").copy())

    def tagged(self, count: int) -> torch.Tensor:
        """A weight blob: a storage tag, then the values (float16 data is padded to 4 bytes)."""
        (tag,) = struct.unpack("<I", self._take(4))
        if tag == _TAG_FLOAT16:
            values = np.frombuffer(self._take(2 * count), dtype="<f2").copy()
            self._take((-2 * count) % 4)
            return torch.from_numpy(values)
        if tag in (_TAG_FLOAT32, _TAG_RAW_FLOAT32):
            return self.float32(count)
        raise NcnnFormatError(f"weight blob at offset {self._offset - 4} has unsupported storage tag {tag:#010x}")


def state_dict_keys(weighted: list[WeightedLayer]) -> list[str]:
    """The spandrel state-dict prefix for each weighted layer, by recognising the network.

    SRVGGNetCompact alternates Convolution and PReLU and numbers both in `body`; RRDBNet is a
    first conv, `n` RRDB blocks of three 5-conv dense blocks, then five convs.
    """
    types = [item.layer.type for item in weighted]
    if "PReLU" in types:
        return [f"body.{index}" for index in range(len(weighted))]
    blocks, rest = divmod(len(weighted) - 6, 15)
    if types.count("Convolution") != len(types) or rest or blocks < 1:
        raise NcnnFormatError(f"{len(weighted)} weighted layers match neither RRDBNet nor SRVGGNetCompact")
    body = [f"body.{block}.rdb{rdb}.conv{conv}" for block in range(blocks) for rdb in (1, 2, 3) for conv in range(1, 6)]
    return ["conv_first", *body, "conv_body", "conv_up1", "conv_up2", "conv_hr", "conv_last"]


def convert(param_path: Path, bin_path: Path) -> dict[str, torch.Tensor]:
    """A `.param`/`.bin` pair as a state dict with spandrel's key names (float16 weights stay float16)."""
    layers = parse_param(param_path.read_text())
    weighted = read_weights(layers, bin_path.read_bytes())
    state: dict[str, torch.Tensor] = {}
    for prefix, item in zip(state_dict_keys(weighted), weighted):
        for suffix, tensor in item.tensors.items():
            state[f"{prefix}.{suffix}"] = tensor
    return state
