"""AuraSR: Loupe's local engine against fal's `aura-sr` package, with the same random full-size weights.

    pip install --no-deps aura-sr==0.0.4   # its module only needs torch, torchvision, einops and pillow
    python -m scripts.bench_aura --side 1024 --runs 3

Every contender upscales the same photo ×4, fp32, with one set of seeded random weights in the AuraSR-v2
configuration (618 M parameters): fal's `upscale_4x` (one pass over the 64-px grid) and `upscale_4x_overlapped`
(a second pass shifted by half a tile, checkerboard weights), both in batches of --batch, and Loupe's
`LocalEngine.upscale_sync` with LOUPE_AURA_OVERLAP off and on (batch sized from free memory). Each contender runs
in a fresh subprocess: once to warm up, then --runs times. The table gives the median seconds, the peak CUDA
memory (`max_memory_allocated`, weights included) and the peak host RSS (`ru_maxrss`), both the contender's own.
Random weights make the pictures meaningless, so only time and memory are compared. `--reduced` swaps in a tiny
configuration, to check the script itself on a CPU in seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import subprocess
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
from safetensors.torch import load_file, save_file
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


CONTENDERS = ("aura-sr upscale_4x", "aura-sr upscale_4x_overlapped", "loupe, one pass", "loupe, two passes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=1024, help="input side in pixels (the output is 4× that)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="tiles per pass for the aura-sr package")
    parser.add_argument("--reduced", action="store_true", help="a tiny configuration, to check the script")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weights-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import aura_sr  # noqa: F401
    except ImportError:
        sys.exit("the aura-sr package is missing: pip install --no-deps aura-sr==0.0.4")
    if args.worker:
        print(json.dumps(run_contender(args.worker, args)))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    state = SpandrelAuraSR(**(REDUCED if args.reduced else FULL)).state_dict()
    with tempfile.TemporaryDirectory() as weights_dir:
        path = MANIFEST["aura-sr"].official_path(Path(weights_dir))
        path.parent.mkdir(parents=True)
        save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
        del state
        rows = [spawn(label, args, Path(weights_dir)) for label in CONTENDERS]
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"AuraSR ×4, {args.side}² → {4 * args.side}², {'reduced' if args.reduced else 'full'} configuration, "
          f"{where}, fp32, median of {args.runs} runs after 1 warm-up\n")
    print("| contender | seconds (median) | peak CUDA memory | peak host RSS |\n|---|---|---|---|")
    for label, result in zip(CONTENDERS, rows):
        if "failure" in result:
            print(f"| {label} | {result['failure']} | | |")
            continue
        vram = f"{result['peak_vram'] / 2**30:.2f} GiB" if device == "cuda" else "n/a"
        print(f"| {label}{result['detail']} | {result['seconds']:.2f} | {vram} | {result['peak_rss'] / 2**30:.2f} GiB |")


def spawn(label: str, args: argparse.Namespace, weights_dir: Path) -> dict[str, Any]:
    command = [sys.executable, "-m", "scripts.bench_aura", "--worker", label, "--weights-dir", str(weights_dir),
               "--side", str(args.side), "--runs", str(args.runs), "--batch", str(args.batch)]
    done = subprocess.run(command + (["--reduced"] if args.reduced else []), capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return {"failure": f"failed: {tail[:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_contender(label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load one contender from the saved weights, warm it up, time it: what a worker subprocess reports."""
    from aura_sr import AuraSR

    device = "cuda" if torch.cuda.is_available() else "cpu"
    image = Image.fromarray(skimage.data.astronaut()).resize((args.side, args.side), Image.Resampling.LANCZOS)
    weights_path = MANIFEST["aura-sr"].official_path(args.weights_dir)
    run: Callable[[], object]
    engine: LocalEngine | None = None
    if label.startswith("aura-sr"):
        fal = AuraSR(REDUCED if args.reduced else FULL, device=device)
        fal.upsampler.load_state_dict(load_file(str(weights_path)))
        fal.upsampler.eval()
        upscale = fal.upscale_4x_overlapped if label.endswith("overlapped") else fal.upscale_4x
        run = lambda: upscale(image, max_batch_size=args.batch)  # noqa: E731
    else:
        entry = catalog.find("aura-sr")
        assert entry is not None
        engine = LocalEngine(Settings(weights_dir=args.weights_dir, device=device, compile=False,
                                      aura_overlap=label.endswith("two passes")))
        picture, target = Picture(np.asarray(image).copy()), (4 * args.side, 4 * args.side)
        run = lambda: engine.upscale_sync(engine.plan(entry, picture, target), picture, seed=0)  # noqa: E731
    run()  # loads the model, warms the kernels up
    if engine is None:
        detail = f", batch {args.batch}"
    else:
        loaded = engine.workers[0].cache.peek("aura-sr")
        detail = f", batch {loaded.batch if loaded else '?'}"
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(args.runs):
        started = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if engine is not None:
        asyncio.run(engine.close())
    return {"seconds": statistics.median(times), "detail": detail,
            "peak_vram": torch.cuda.max_memory_allocated() if device == "cuda" else 0,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # kilobytes on Linux


if __name__ == "__main__":
    main()
