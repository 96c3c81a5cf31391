"""AuraSR's noise, drawn from the request's seed instead of torch's global generators.

spandrel's AuraSR samples twice per forward pass: its style latent (`torch.randn`, unless the
latent comes in as the `noise` argument) and a slight jitter of its input (`torch.randn_like`).
Both come from here. The latent is one per seed, shared by every window of the image (fal's package
draws one per tile, so neighbouring tiles differ in texture and the grid shows more); the jitter
is a function of the seed and of the image position, drawn in 64-px cells from generators seeded
by (seed, cell), so overlapping windows see the same jitter where they overlap. Neither depends
on the batch, the order the tiles run in, the device or other requests: the same seed and image
give the same output.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from server.engine.tiling import Box

CELL = 64  # side of the blocks the jitter is drawn in
_STYLE, _JITTER = 0, 1  # what a generator is drawn for: part of its key


class SeededBatch(torch.Tensor):
    """A batch of windows that carries the noise the network will draw for it.

    Its `torch.randn_like(batch)` answers with `jitter`; `style` is for the forward's `noise`
    argument. Every other operation on it runs as on a plain tensor and gives plain tensors, so
    the subclass ends at the network's first line.
    """

    jitter: torch.Tensor
    style: torch.Tensor

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if func is torch.randn_like and isinstance(args[0], SeededBatch):
            if args[1:] or kwargs:
                raise RuntimeError("AuraSR drew input noise in a way Loupe does not seed; outputs would not repeat")
            return args[0].jitter
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


class SeededNoise:
    """The noise of one request, for any window of its image."""

    def __init__(self, seed: int, network: torch.nn.Module) -> None:
        if seed < 0:
            raise ValueError(f"a seed is a non-negative integer, not {seed}")
        self.seed = seed
        style_dim = int(network.style_network.dim_in)
        self.style = torch.randn(style_dim, generator=self._generator(_STYLE, 0, 0))

    def attach(self, batch: torch.Tensor, windows: Sequence[Box]) -> SeededBatch:
        """`batch` (N, 3, H, W), the pixels under `windows`, carrying their noise."""
        if len(windows) != batch.shape[0]:
            raise ValueError(f"{len(windows)} windows for a batch of {batch.shape[0]}")
        jitter = torch.stack([self.jitter(window) for window in windows])
        if jitter.shape != batch.shape:
            raise ValueError(f"windows of {tuple(jitter.shape)} for a batch of {tuple(batch.shape)}")
        seeded = batch.as_subclass(SeededBatch)
        seeded.jitter = jitter.to(batch.device, batch.dtype)
        seeded.style = self.style.to(batch.device, batch.dtype).expand(len(windows), -1)
        return seeded

    def jitter(self, window: Box) -> torch.Tensor:
        """(3, height, width) standard normal noise under `window`; it may reach past the image."""
        out = torch.empty(3, window.height, window.width)
        for row in range(window.y0 // CELL, -(-window.y1 // CELL)):
            for column in range(window.x0 // CELL, -(-window.x1 // CELL)):
                cell = Box(column * CELL, row * CELL, (column + 1) * CELL, (row + 1) * CELL)
                x0, y0 = max(cell.x0, window.x0), max(cell.y0, window.y0)
                x1, y1 = min(cell.x1, window.x1), min(cell.y1, window.y1)
                noise = torch.randn(3, CELL, CELL, generator=self._generator(_JITTER, row, column))
                out[:, y0 - window.y0 : y1 - window.y0, x0 - window.x0 : x1 - window.x0] = \
                    noise[:, y0 - cell.y0 : y1 - cell.y0, x0 - cell.x0 : x1 - cell.x0]
        return out

    def _generator(self, kind: int, row: int, column: int) -> torch.Generator:
        # SeedSequence mixes the key, so nearby seeds and cells give unrelated streams.
        key = (kind, _natural(row), _natural(column))
        state = np.random.SeedSequence(self.seed, spawn_key=key).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))


def _natural(value: int) -> int:
    """Integers to naturals, one to one (0, -1, 1, -2, … → 0, 1, 2, 3, …): cells left of or above the image."""
    return 2 * value if value >= 0 else -2 * value - 1
