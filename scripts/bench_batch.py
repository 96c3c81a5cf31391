"""A folder batch: `loupe upscale DIR -o OUT` against a plain sequential loop, in images per second.

    python -m scripts.bench_batch --write docs/benchmarks.md

A folder of 24 photos (scikit-image's, cropped and resized to 320×240, saved as PNG) is upscaled ×4 with
animevideov3 to PNG files, by three contenders in one process:

- plain: what a script would do, one file at a time: Pillow decodes, spandrel runs the network in fp32 NCHW
  on the whole frame, Pillow encodes (its default PNG level) and saves;
- loupe-sequential: Loupe's batch handed one file at a time, so nothing overlaps: the per-file work alone;
- loupe-batch: Loupe's batch over the folder, decode and encode overlapping the model's runs.

Every contender is warmed up once (the model loaded); then the timed runs go round robin, one run of every
contender a round, the order rotated by one each round, and the median of each contender's runs is reported.
"""
from __future__ import annotations

import argparse
import datetime
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.data
import spandrel
import torch
from PIL import Image

from scripts.bench import WEIGHTS_DIR, _cpu_flags, _device_name, _revision, append_section, psnr
from server import batch, catalog, folders
from server.config import Settings
from server.engine.models import execution_for
from server.engine.runtime import LocalEngine
from server.engine.weights import MANIFEST, find_weights
from server.jobs import parse_size

MODEL, WEIGHT = "realesr-animevideov3", "realesr-animevideov3-x4"
SCALE = 4
CONTENDERS = ("plain", "loupe-sequential", "loupe-batch")


def make_photos(folder: Path, count: int, size: tuple[int, int] = (320, 240)) -> list[Path]:
    """`count` different PNG photos of `size`: 4:3 windows of scikit-image's colour photos, at three zooms and
    two offsets each, resized with Lanczos."""
    folder.mkdir()
    sources = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    paths = []
    for index in range(count):
        photo = Image.fromarray(sources[index % len(sources)])
        variant = index // len(sources) % 6
        width = min(photo.width, photo.height * size[0] // size[1]) * (6 - variant % 3) // 6
        height = width * size[1] // size[0]
        left = (photo.width - width) * (variant // 3)  # the left or the right edge
        window = photo.crop((left, (photo.height - height) // 2, left + width, (photo.height + height) // 2))
        path = folder / f"photo-{index:02d}.png"
        window.resize(size, Image.Resampling.LANCZOS).save(path)
        paths.append(path)
    return paths


def plain_loop(sources: list[Path], out: Path) -> Callable[[], None]:
    """Decode → spandrel fp32 NCHW → encode, one file after another, as a user's script would."""
    weights = find_weights(WEIGHT, WEIGHTS_DIR)
    if weights is None:
        raise SystemExit(f"no weights for {WEIGHT} in {WEIGHTS_DIR}: run `loupe weights ensure`")
    network = spandrel.ModelLoader().load_from_file(weights).model.eval()

    @torch.inference_mode()
    def run() -> None:
        for source in sources:
            pixels = np.asarray(Image.open(source).convert("RGB"), dtype=np.float32) / 255
            output = network(torch.from_numpy(pixels).permute(2, 0, 1)[None])
            upscaled = (output[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(upscaled).save(out / source.name)

    return run


def loupe(engine: LocalEngine, settings: Settings, sources: list[Path], out: Path,
          one_at_a_time: bool) -> Callable[[], None]:
    entry = catalog.find(MODEL)
    assert entry is not None
    options = batch.Options(entry, overwrite=True)
    items = [folders.Item(source, out / source.name, "png") for source in sources]

    def run() -> None:
        groups = [[item] for item in items] if one_at_a_time else [items]
        for group in groups:
            report = batch.Batch(engine, settings, options, group).run()
            if report.summary.upscaled != len(group):
                raise SystemExit(f"Loupe's batch did not upscale every file: {report.summary}")

    return run


@dataclass
class Row:
    contender: str
    seconds: list[float]
    psnr: float  # mean over the files, against plain's fp32 outputs


def bench(args: argparse.Namespace, scratch: Path) -> tuple[list[Row], str]:
    sources = make_photos(scratch / "photos", args.files, args.size)
    outs = {name: scratch / name for name in CONTENDERS}
    for folder in outs.values():
        folder.mkdir()
    settings = Settings(weights_dir=WEIGHTS_DIR, data_dir=scratch / "data")
    engine = LocalEngine(settings)
    runs = {
        "plain": plain_loop(sources, outs["plain"]),
        "loupe-sequential": loupe(engine, settings, sources, outs["loupe-sequential"], one_at_a_time=True),
        "loupe-batch": loupe(engine, settings, sources, outs["loupe-batch"], one_at_a_time=False),
    }
    for run in runs.values():
        run()  # warm-up: loads the model, fills the caches
    seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for round_ in range(args.repeats):
        order = CONTENDERS[round_ % len(CONTENDERS):] + CONTENDERS[: round_ % len(CONTENDERS)]
        for name in order:
            started = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - started)
            print(f"round {round_ + 1}: {name} {seconds[name][-1]:.2f} s", file=sys.stderr)
    execution = execution_for(MANIFEST[WEIGHT].architecture, engine.devices[0], settings.precision)
    rows = []
    for name in CONTENDERS:
        quality = [psnr(np.asarray(Image.open(outs["plain"] / s.name)), np.asarray(Image.open(outs[name] / s.name)))
                   for s in sources]
        rows.append(Row(name, seconds[name], statistics.mean(quality)))
    return rows, f"{execution.precision} {execution.layout}"


def report(rows: list[Row], args: argparse.Namespace, loupe_runs_as: str, command: str) -> str:
    today = datetime.date.today().isoformat()
    width, height = args.size
    plain = statistics.median(rows[0].seconds)
    what = {
        "plain": "Pillow decode → spandrel fp32 NCHW, whole frame → Pillow PNG (level 6), one file at a time",
        "loupe-sequential": f"Loupe's per-file work ({loupe_runs_as}), one file at a time, nothing overlapping",
        "loupe-batch": f"`loupe upscale DIR -o OUT`'s pipeline ({loupe_runs_as}): decode and encode overlap "
                       "the model's runs",
    }
    lines = [
        f"## {today}: CPU, a folder batch: {args.files} photos {width}×{height} → "
        f"{width * SCALE}×{height * SCALE} PNG, animevideov3",
        "",
        f"Command: `{command}`  ",
        f"Date: {today}; device: {_device_name(torch.device('cpu'))}, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, spandrel {spandrel.__version__}, Loupe {_revision()}  ",
        f"CPU flags: {_cpu_flags()}  ",
        f"All contenders in one process, each warmed up once; then {args.repeats} rounds, one run of every "
        "contender a round, in an order rotated each round; the median of each. The machine is shared and "
        "noisy, which is why the runs alternate: the ratio is the figure to read.",
        "",
        "| contender | what it is | median s | images/s | × plain | PSNR vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        median = statistics.median(row.seconds)
        quality = "identical" if row.psnr == float("inf") else f"{row.psnr:.1f} dB"
        lines.append(f"| {row.contender} | {what[row.contender]} | {median:.2f} | {args.files / median:.2f} | "
                     f"{plain / median:.2f}× | {quality} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--files", type=int, default=24)
    parser.add_argument("--size", type=parse_size, default=(320, 240), metavar="WxH", help="each photo's size")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per contender (the median is reported)")
    parser.add_argument("--write", type=Path, help="append the results as a dated markdown section to this file")
    args = parser.parse_args(argv)
    if args.files < 1 or args.repeats < 1 or args.size is None or min(args.size) < 1:
        parser.error("--files and --repeats must be at least 1, and --size look like 320x240")
    command = "python -m scripts.bench_batch " + shlex.join(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="loupe-bench-batch-") as scratch:
        rows, runs_as = bench(args, Path(scratch))
    text = report(rows, args, runs_as, command)
    print(text)
    if args.write is not None:
        append_section(args.write, text)


if __name__ == "__main__":
    main()
