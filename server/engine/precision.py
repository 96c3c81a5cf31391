"""The precision and memory layout a network runs in on a device: one policy, from what the hardware does.

- CUDA: fp16 where the architecture takes it, else bf16 where it and the GPU do, else fp32.
- A CPU with native bf16 arithmetic (AVX512-BF16 or AMX): bf16. torch runs bf16 on any AVX-512 CPU, but
  without those instructions it emulates it, slower than fp32.
- Elsewhere fp32.

Convolution nets run channels_last on every device: oneDNN and cuDNN both have their fastest kernels there
(x4plus on 2 EPYC cores: fp32 NCHW 3.6–4.4 s, channels_last 3.1 s, bf16 channels_last 1.45 s for 160²).
An architecture whose profile says `fp32_only` (AuraSR) stays fp32, whatever is asked for.

`LOUPE_PRECISION` (auto, fp32, bf16, fp16) overrides the choice; where the architecture can't take the
precision asked for, it runs fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
import torch

from server.config import PrecisionSetting, SettingsError

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


@dataclass(frozen=True)
class Capabilities:
    """What an architecture can run in; from spandrel's descriptor and the architecture's profile."""

    half: bool = True
    bfloat16: bool = True
    fp32_only: bool = False
    channels_last: bool = True


@dataclass(frozen=True)
class Execution:
    """How a network runs: its dtype and memory layout."""

    dtype: torch.dtype
    channels_last: bool

    @property
    def precision(self) -> str:
        return NAMES[self.dtype]

    @property
    def layout(self) -> str:
        return "channels_last" if self.channels_last else "contiguous"


@cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX, from torch's CPU feature probe, else the kernel's CPU flags."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(probe) for probe in probes):
        return any(probe() for probe in probes)  # type: ignore[misc]
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def has_native_bf16(device: torch.device) -> bool:
    """Whether `device`, here, does bf16 arithmetic natively."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


def check_setting(setting: PrecisionSetting, devices: list[torch.device]) -> None:
    """A precision no device here can run is a start-up error, never a silent fallback."""
    if setting == "fp16" and any(device.type == "cpu" for device in devices):
        raise SettingsError("LOUPE_PRECISION=fp16 needs a GPU: the CPU has no fp16 kernels for these networks; "
                         "use auto, fp32 or bf16")


def choose(setting: PrecisionSetting, device: torch.device, capabilities: Capabilities,
           native_bf16: bool | None = None) -> Execution:
    """The dtype and layout for a network with `capabilities` on `device`.

    `native_bf16` says whether the device has bf16 arithmetic (None: detect it on this machine's device).
    """
    channels_last = capabilities.channels_last
    if capabilities.fp32_only:
        return Execution(torch.float32, channels_last)
    if setting == "auto":
        dtype = _automatic(device, capabilities, has_native_bf16(device) if native_bf16 is None else native_bf16)
    else:
        dtype = DTYPES[setting]
        if (dtype == torch.float16 and not capabilities.half) or (dtype == torch.bfloat16 and not capabilities.bfloat16):
            dtype = torch.float32
    return Execution(dtype, channels_last)


def _automatic(device: torch.device, capabilities: Capabilities, native_bf16: bool) -> torch.dtype:
    if device.type == "cuda":
        if capabilities.half:
            return torch.float16
        if capabilities.bfloat16 and native_bf16:
            return torch.bfloat16
        return torch.float32
    return torch.bfloat16 if capabilities.bfloat16 and native_bf16 else torch.float32
