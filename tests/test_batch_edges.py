"""The real `loupe upscale` at its edges: file names that are not UTF-8, a report that can't be written, an output
that is a file. Usage errors are one line and exit 2 before any work; a finished batch always reports."""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from tests import photos
from tests.processes import loupe_env, run_loupe

MODEL = "realesr-animevideov3"


def _photos(folder: Path, *names: str | bytes) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / (os.fsdecode(name) if isinstance(name, bytes) else name) for name in names]
    for path in paths:
        Image.fromarray(photos.coffee((24, 16))).save(path, "PNG")
    return paths


def test_a_file_name_that_is_not_utf8_is_upscaled_and_reported(tmp_path: Path, weights_dir: Path) -> None:
    _photos(tmp_path / "in", b"caf\xe9.png", "plain.png")
    report = tmp_path / "report.json"
    done = run_loupe("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", MODEL, "--scale", "2",
                     "--report", str(report), env=loupe_env(weights_dir, tmp_path / "data"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 files: 2 upscaled" in done.stdout
    assert sorted(os.listdir(os.fsencode(tmp_path / "out"))) == [b"caf\xe9.png", b"plain.png"]
    files = {Path(record["path"]).name: record for record in json.loads(report.read_text())["files"]}
    assert set(files) == {"caf\\xe9.png", "plain.png"}  # the byte that isn't UTF-8, as an escape
    assert all(record["status"] == "upscaled" for record in files.values())


def test_an_unwritable_report_is_a_usage_error_before_any_work(tmp_path: Path, weights_dir: Path) -> None:
    _photos(tmp_path / "in", "a.png")
    (tmp_path / "a-file").write_text("not a folder")
    env = loupe_env(weights_dir, tmp_path / "data")
    for report in (tmp_path / "a-file" / "report.json", tmp_path / "in"):
        refused = run_loupe("upscale", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", MODEL,
                            "--report", str(report), env=env)
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert len(refused.stderr.strip().splitlines()) == 1 and "--report" in refused.stderr
        assert not (tmp_path / "out").exists()


def test_an_output_that_is_a_file_is_a_usage_error(tmp_path: Path, weights_dir: Path) -> None:
    first, second = _photos(tmp_path / "in", "a.png", "b.png")
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")
    env = loupe_env(weights_dir, tmp_path / "data")
    for command in ([str(tmp_path / "in"), "-o", str(existing)],  # a folder into a file that exists
                    [str(first), str(second), "-o", str(tmp_path / "big.png")],  # two files into one name
                    [str(tmp_path / "in"), "-o", str(existing / "under")]):  # a folder under a file
        refused = run_loupe("upscale", *command, "--model", MODEL, env=env)
        assert refused.returncode == 2, (command, refused.stderr[-3000:])
        assert len(refused.stderr.strip().splitlines()) == 1 and "-o" in refused.stderr
    assert existing.read_bytes() == b"keep me" and not (tmp_path / "big.png").exists()
