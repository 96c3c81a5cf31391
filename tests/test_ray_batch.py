"""`loupe upscale --ray`: the folder batch on Ray Data, on a local Ray of this machine, against the local batch."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import photos
from tests.test_batch import _photo_folder
from tests.test_ray import _env, _short_dir


@pytest.mark.slow
def test_a_ray_batch_writes_what_the_local_batch_writes(tmp_path: Path, weights_dir: Path) -> None:
    source = tmp_path / "photos"
    _photo_folder(source)
    data_dir = _short_dir()

    def upscale(out: str, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
        report = tmp_path / f"{out}.json"
        done = subprocess.run([sys.executable, "-m", "server.cli", "upscale", str(source), "-o", str(tmp_path / out),
                               "--model", "realesr-animevideov3", "--scale", "2", "--report", str(report), *flags],
                              env=_env(weights_dir, data_dir), capture_output=True, text=True, timeout=300)
        return done, json.loads(report.read_text())

    local, local_report = upscale("local")
    on_ray, ray_report = upscale("ray", "--ray")

    assert (on_ray.returncode, local.returncode) == (1, 1), on_ray.stderr[-3000:]  # the truncated PNG, both times
    assert "trip/cut.png: The image could not be decoded" in on_ray.stderr

    def comparable(report: dict[str, object], out: str) -> list[dict[str, object]]:
        return [{**record, "seconds": 0, "output": (record["output"] or "").replace(out, "OUT")}
                for record in report["files"]]  # type: ignore[attr-defined]

    assert comparable(ray_report, str(tmp_path / "ray")) == comparable(local_report, str(tmp_path / "local"))
    outputs = sorted(path.relative_to(tmp_path / "local") for path in (tmp_path / "local").rglob("*") if path.is_file())
    assert outputs == sorted(path.relative_to(tmp_path / "ray") for path in (tmp_path / "ray").rglob("*")
                             if path.is_file())
    for name in outputs:  # the same encoder on the same pixels: the same bytes, EXIF, ICC, 16 bits and alpha
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name

    again, report = upscale("ray", "--ray")  # resumes: nothing left to do, so no Ray is even started
    assert again.returncode == 1 and report["summary"]["skipped"] == 10  # type: ignore[index]
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.slow
def test_sigterm_stops_a_ray_batch_and_the_next_run_resumes(tmp_path: Path, weights_dir: Path) -> None:
    source, out, report = tmp_path / "photos", tmp_path / "big", tmp_path / "report.json"
    source.mkdir()
    for index in range(8):  # about a second each on one CPU
        Image.fromarray(np.roll(photos.coffee((256, 192)), index * 7, axis=1)).save(source / f"{index:02}.png")
    data_dir = _short_dir()
    command = [sys.executable, "-m", "server.cli", "upscale", str(source), "-o", str(out), "--model",
               "realesr-animevideov3", "--scale", "2", "--report", str(report), "--ray"]
    batch = subprocess.Popen(command, env=_env(weights_dir, data_dir), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(out.glob("*.png")):
        assert batch.poll() is None and time.monotonic() < deadline, batch.communicate()[1][-3000:]
        time.sleep(0.05)
    batch.send_signal(signal.SIGTERM)  # as Ctrl-C does; this one Ray would otherwise take for itself
    _, stderr = batch.communicate(timeout=120)

    assert batch.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "the files in flight are discarded" in stderr
    stopped = json.loads(report.read_text())
    summary = stopped["summary"]
    assert summary["stopped"] and summary["upscaled"] >= 1 and summary["interrupted"] >= 1
    assert summary["upscaled"] + summary["interrupted"] == summary["files"] == 8
    upscaled = {Path(record["output"]).name for record in stopped["files"] if record["status"] == "upscaled"}
    assert upscaled == {path.name for path in out.glob("*.png")}  # the report says what is there
    for path in out.glob("*.png"):
        with Image.open(path) as image:
            image.load()
            assert image.size == (512, 384)

    resumed = subprocess.run(command, env=_env(weights_dir, data_dir), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(report.read_text())["summary"]
    assert summary["upscaled"] + summary["skipped"] == 8 and summary["skipped"] == len(upscaled)
    assert len(list(out.glob("*.png"))) == 8
    shutil.rmtree(data_dir, ignore_errors=True)
