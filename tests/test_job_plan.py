"""One plan per job: the dry run reports exactly what the real job then runs, and tiles are planned for the least work.

Through HTTP with the openai SDK, against a live Loupe with the real animevideov3 weights on 127.0.0.1.
"""
from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from server import catalog
from server.engine.runtime import LocalEngine
from server.imaging import Picture
from tests import photos
from tests.conftest import loupe_settings
from tests.servers import serve

MODEL = "realesr-animevideov3"


@pytest.fixture(scope="module")
def tiled_url(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server that cuts 48-px tiles, so that each job runs several."""
    from server.app import create_app

    with serve(create_app(loupe_settings(weights_dir, tmp_path_factory.mktemp("data"), tile_size=48))) as url:
        yield url


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    if pixels.dtype == np.uint16:  # Pillow writes 16-bit PNGs from single-channel images only; RGB goes as 8-bit
        Image.fromarray(pixels[..., 0]).save(buffer, format="PNG")
    else:
        Image.fromarray(pixels.squeeze()).save(buffer, format="PNG")
    return buffer.getvalue()


def ramp(width: int, height: int) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width, dtype=np.uint8), (height, 1))[..., None]


PICTURES = {
    "rgba, varying alpha": lambda: np.concatenate([photos.coffee((100, 70)), ramp(100, 70)], axis=2),
    "rgba, constant alpha": lambda: np.concatenate([photos.coffee((100, 70)), np.full((70, 100, 1), 200, np.uint8)],
                                                   axis=2),
    "grayscale": lambda: photos.coffee((100, 70))[..., :1].copy(),
    "16-bit grayscale": lambda: photos.coffee((100, 70))[..., :1].astype(np.uint16) * 257,
}
EXPECTED_RUNS = {"rgba, varying alpha": 2, "rgba, constant alpha": 1, "grayscale": 1, "16-bit grayscale": 1}


def tiles_processed(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("loupe_tiles_processed_total "):
            return float(line.split()[1])
    raise AssertionError("no loupe_tiles_processed_total metric")


@pytest.mark.parametrize("kind", list(PICTURES))
def test_the_dry_run_reports_exactly_the_model_runs_and_tiles_the_job_makes(tiled_url: str, kind: str) -> None:
    client = openai.OpenAI(base_url=f"{tiled_url}/v1", api_key="unused", max_retries=0, timeout=120)
    body = png(PICTURES[kind]())
    options = {"model": MODEL, "prompt": "", "extra_body": {"scale_factor": 3}}
    raw = client.images.with_raw_response.edit(image=("photo.png", body, "image/png"), extra_query={"dryRun": "true"},
                                               **options)  # type: ignore[arg-type]
    planned = json.loads(raw.text)
    assert planned["plan"]["model_runs"] == EXPECTED_RUNS[kind]
    assert planned["plan"]["tiles"] == EXPECTED_RUNS[kind] * 3 * 2  # 100×70 in 48-px tiles: 3 × 2
    before = tiles_processed(tiled_url)
    result = client.images.edit(image=("photo.png", body, "image/png"), **options)  # type: ignore[arg-type]
    assert tiles_processed(tiled_url) - before == planned["plan"]["tiles"]
    assert result.size == planned["size"] == "300x210"
    assert result.metadata["executed_model"] == planned["executed_model"]  # type: ignore[attr-defined]


def test_the_dry_run_shows_the_precision_and_layout_it_will_run(tiled_url: str) -> None:
    response = httpx.post(f"{tiled_url}/v1/images/edits?dryRun=true", data={"model": MODEL, "scale_factor": "4"},
                          files={"image": png(photos.coffee((100, 70)))}, timeout=60)
    plan = response.json()["plan"]
    card = httpx.get(f"{tiled_url}/v1/models/{MODEL}").json()
    assert plan["precision"] == plan["passes"][0]["precision"] == card["local"]["precision"]
    assert plan["layout"] == card["local"]["layout"] == "channels_last"


def test_a_truncated_image_fails_the_dry_run_as_it_fails_the_run(tiled_url: str) -> None:
    broken = png(photos.coffee((100, 70)))[:-200]
    statuses = [httpx.post(f"{tiled_url}/v1/images/edits{query}", data={"model": MODEL},
                           files={"image": broken}, timeout=60).status_code for query in ("?dryRun=true", "")]
    assert statuses[0] == statuses[1] and 400 <= statuses[0] < 500


def test_an_image_that_fits_in_memory_runs_as_one_full_frame_on_the_cpu(weights_dir: Path, tmp_path: Path) -> None:
    engine = LocalEngine(loupe_settings(weights_dir, tmp_path))
    entry = catalog.find("realesrgan-x4plus")
    assert entry is not None
    (step,) = engine.plan(entry, Picture(photos.coffee((451, 300))), (902, 600)).passes
    assert len(step.tiles.tiles) == 1 and step.tiles.window == (451, 300)  # no context read past the border
