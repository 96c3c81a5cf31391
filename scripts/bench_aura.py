"""AuraSR: Loupe's local engine against fal's `aura-sr` package, with the same random full-size weights.

    pip install --no-deps aura-sr==0.0.4   # its module only needs torch, torchvision, einops and pillow
    python -m scripts.bench_aura --side 1024 --runs 3

Every contender upscales the same photo ×4, fp32, with one set of seeded random weights in the AuraSR-v2
configuration (618 M parameters): fal's `upscale_4x` (one pass over the 64-px grid) and `upscale_4x_overlapped`
(a second pass shifted by half a tile, checkerboard weights), both in batches of --batch, and Loupe's
`LocalEngine.upscale_sync` with LOUPE_AURA_OVERLAP off and on (batch sized from free memory). Each is run once to
warm up, then --runs times; the table gives the median seconds and the peak CUDA memory. Random weights make the
pictures meaningless, so only time and memory are compared. `--reduced` swaps in a tiny configuration, to check
the script itself on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.AuraSR import AuraSR as SpandrelAuraSR

from server import catalog
from server.config import Settings
from server.engine.runtime import LocalEngine
from server.engine.weights import MANIFEST
from server.imaging import Picture

# fal/AuraSR-v2 config.json
FULL: dict[str, Any] = {
    "dim": 64, "image_size": 256, "input_image_size": 64,
    "style_network": {"dim_in": 128, "dim_out": 512, "depth": 4},
    "up_dim_mults": (1, 2, 4, 8, 16), "down_dim_mults": (4, 8, 16), "channels": 3, "resnet_block_groups": 8,
    "full_attn": (False, False, False, True, True), "flash_attn": True, "self_attn_dim_head": 64,
    "self_attn_heads": 8, "attn_depths": (2, 2, 2, 2, 4), "mid_attn_depth": 4, "num_conv_kernels": 4,
    "resize_mode": "bilinear", "unconditional": True, "skip_connect_scale": 0.4,
}
# The package draws a 128-wide style latent whatever the configuration, so the tiny one keeps that width.
REDUCED: dict[str, Any] = {
    **FULL, "dim": 4, "style_network": {"dim_in": 128, "dim_out": 512, "depth": 1}, "up_dim_mults": (1, 1, 2, 2, 4),
    "down_dim_mults": (2, 2, 4), "self_attn_dim_head": 4, "attn_depths": (2, 2, 2, 1, 1), "mid_attn_depth": 1,
    "num_conv_kernels": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=1024, help="input side in pixels (the output is 4× that)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="tiles per pass for the aura-sr package")
    parser.add_argument("--reduced", action="store_true", help="a tiny configuration, to check the script")
    args = parser.parse_args()
    try:
        from aura_sr import AuraSR
    except ImportError:
        sys.exit("the aura-sr package is missing: pip install --no-deps aura-sr==0.0.4")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = REDUCED if args.reduced else FULL
    torch.manual_seed(0)
    state = SpandrelAuraSR(**config).state_dict()
    image = Image.fromarray(skimage.data.astronaut()).resize((args.side, args.side), Image.Resampling.LANCZOS)
    photo = np.asarray(image)

    fal = AuraSR(config, device=device)
    fal.upsampler.load_state_dict(state)
    fal.upsampler.eval()
    contenders: dict[str, Callable[[], object]] = {
        f"aura-sr upscale_4x, batch {args.batch}": lambda: fal.upscale_4x(image, max_batch_size=args.batch),
        f"aura-sr upscale_4x_overlapped, batch {args.batch}":
            lambda: fal.upscale_4x_overlapped(image, max_batch_size=args.batch),
    }
    with tempfile.TemporaryDirectory() as weights_dir:
        path = MANIFEST["aura-sr"].official_path(Path(weights_dir))
        path.parent.mkdir(parents=True)
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
        entry = catalog.find("aura-sr")
        assert entry is not None
        picture, target = Picture(photo.copy()), (4 * args.side, 4 * args.side)
        engines = {overlap: LocalEngine(Settings(weights_dir=Path(weights_dir), device=device, compile=False,
                                                 aura_overlap=overlap)) for overlap in (False, True)}
        for overlap, engine in engines.items():
            contenders[f"loupe, {'two passes' if overlap else 'one pass'}"] = \
                lambda engine=engine: engine.upscale_sync(entry, picture, target, seed=0)
        rows = [measure(label, run, args.runs, device) for label, run in contenders.items()]
        loaded = engines[True].workers[0].cache.peek("aura-sr")
        for engine in engines.values():
            asyncio.run(engine.close())
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"AuraSR ×4, {args.side}² → {4 * args.side}², {'reduced' if args.reduced else 'full'} configuration, "
          f"{where}; Loupe's batch: {loaded.batch if loaded else '?'}\n")
    print("| contender | seconds (median) | peak CUDA memory above the loaded weights |\n|---|---|---|")
    for label, seconds, peak in rows:
        print(f"| {label} | {seconds:.2f} | {f'{peak / 2**30:.2f} GiB' if device == 'cuda' else '-'} |")


def measure(label: str, run: Callable[[], object], runs: int, device: str) -> tuple[str, float, int]:
    run()  # loads the model, warms the kernels up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if device == "cuda" else 0
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() - resident if device == "cuda" else 0
    return label, statistics.median(times), peak


if __name__ == "__main__":
    main()
