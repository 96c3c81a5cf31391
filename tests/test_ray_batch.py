"""`loupe upscale --ray`: the folder batch on Ray Data, on a local Ray of this machine, against the local batch."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
