"""The executor's own cost on a 10K output: tiling, blending and quantizing, with the network taken out.

    python -m scripts.bench_blend --runs 3

A 2560² photo goes to 10240² through `run_tiled` with x4plus's tiling (512-px tiles, 32 px of context,
16 of blend) on the CPU, but the forward pass is a nearest-neighbour ×4 upscale, so what is timed is what
the executor adds to any network: reading windows, blending tiles into the band, writing final rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from server.engine.executor import run_tiled
from server.engine.profiles import OVERRIDES
from tests.tiny_models import tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=2560)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as weights_dir:
        model = tiny_model(Path(weights_dir), "realesr-animevideov3-x4")
    model = dataclasses.replace(model, spec=dataclasses.replace(model.spec, **{
        field: getattr(OVERRIDES["ESRGAN"].tiling, field) for field in ("context", "blend")}))
    photo = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((args.side, args.side)))

    def nearest(batch: torch.Tensor) -> torch.Tensor:
        return F.interpolate(batch, scale_factor=4, mode="nearest")

    run_tiled(photo[:600, :600].copy(), model, tile=512, forward=nearest)
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        run_tiled(photo, model, tile=512, forward=nearest)
        times.append(time.perf_counter() - started)
    print(f"{args.side}² → {4 * args.side}², {torch.get_num_threads()} threads: median {statistics.median(times):.2f} s "
          f"of {args.runs} ({', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
