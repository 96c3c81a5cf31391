"""scripts/bench.py: the peers' tiling reassembles images exactly, and its smallest CPU run writes a full table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scripts.bench import comfy_upscale, reference_upscale
from server.config import PROJECT_ROOT


def nearest_x4(batch: torch.Tensor) -> torch.Tensor:
    """A pointwise ×4 "network": any tiling that pastes its tiles in the right places gives the untiled answer."""
    return F.interpolate(batch, scale_factor=4, mode="nearest")


def test_reference_and_comfyui_tiles_land_where_they_belong() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (600, 530, 3), dtype=np.uint8)  # several tiles, short edges
    expected = pixels.repeat(4, axis=0).repeat(4, axis=1)
    cpu = torch.device("cpu")
    with torch.inference_mode():
        assert np.array_equal(reference_upscale(nearest_x4, pixels, cpu, torch.float32, tile=256), expected)
        assert np.array_equal(comfy_upscale(nearest_x4, pixels, cpu), expected)


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells] for cells in rows[1:]}


def test_smallest_cpu_run_appends_a_dated_table_with_every_figure(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\nWritten by hand.\n")
    contenders = ["reference", "loupe-file"]
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench", "--preset", "smoke", "--model", "animevideov3",
         "--contenders", *contenders, "--write", str(report)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=540,  # a hang, within pytest-timeout (600 s)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nWritten by hand.\n\n## ")
    assert "Command: `python -m scripts.bench --preset smoke --model animevideov3 --contenders" in text
    assert "torch " in text and "24×24 → 96×96" in text and "avx512_bf16" in text
    rows = table_rows(text)
    assert list(rows) == contenders
    for name in contenders:
        _, _, seconds, rate, ratio, vram, rss, quality = rows[name]
        assert float(seconds) > 0 and float(rate) > 0 and ratio.endswith("×")
        assert vram == "n/a"  # no CUDA on the CPU
        assert 0.1 < float(rss.removesuffix(" GiB")) < 8
        assert float(quality) > 30, f"{name} is not an upscale of the photo: {quality} dB"
    assert rows["reference"][4] == "1.00×"


def test_folder_batch_benchmark_writes_a_ratio_for_each_contender(tmp_path: Path) -> None:
    report = tmp_path / "benchmarks.md"
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench_batch", "--files", "3", "--size", "48x36", "--repeats", "1",
         "--write", str(report)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=540,  # a hang, within pytest-timeout (600 s)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = report.read_text()
    assert "a folder batch: 3 photos 48×36 → 192×144 PNG" in text and "--size 48x36" in text
    rows = table_rows(text)
    assert list(rows) == ["plain", "loupe-sequential", "loupe-batch"]
    for name, (_, _, seconds, rate, ratio, quality) in rows.items():
        assert float(seconds) > 0 and float(rate) > 0 and ratio.endswith("×")
        assert quality == "identical" if name == "plain" else float(quality.removesuffix(" dB")) > 35
