"""`loupe upscale DIR -o OUT`: a folder of real photos, junk and broken files, run as a user runs it."""
from __future__ import annotations

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageCms

from server import catalog
from server.batch import Batch, Options
from server.engine.runtime import LocalEngine
from server.errors import OutOfDeviceMemory
from server.imaging import Picture, resize
from server.folders import collect, is_image_like
from tests import photos
from tests.conftest import loupe_settings

MODEL = "realesr-animevideov3"


def loupe(*args: str, weights_dir: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], env=_env(weights_dir, data_dir),
                          capture_output=True, text=True, timeout=300)


def _env(weights_dir: Path, data_dir: Path) -> dict[str, str]:
    return {**os.environ, "LOUPE_WEIGHTS_DIR": str(weights_dir), "LOUPE_DATA_DIR": str(data_dir),
            "LOUPE_DEVICE": "cpu"}


def _exif_jpeg(path: Path) -> None:
    """A landscape 60x40 JPEG whose EXIF says to show it rotated (orientation 6: 40x60 upright)."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    exif[ExifTags.Base.Make] = "LoupeCam"
    Image.fromarray(photos.coffee((60, 40))).save(path, exif=exif.tobytes(), quality=95)


def _photo_folder(root: Path) -> dict[str, tuple[int, int]]:
    """A photo folder as people have them; returns each image's expected output size at x2, by relative output."""
    (root / "trip" / "day1").mkdir(parents=True)
    (root / "scans").mkdir()
    Image.fromarray(photos.astronaut((48, 48))).save(root / "portrait.png")
    _exif_jpeg(root / "trip" / "rotated.jpg")
    Image.fromarray(photos.chelsea((54, 36))).save(root / "trip" / "day1" / "cat.webp", quality=95)
    rgba = np.dstack([photos.coffee((40, 30)), np.linspace(0, 255, 40 * 30).reshape(30, 40).astype(np.uint8)])
    Image.fromarray(rgba).save(root / "trip" / "day1" / "logo.png")
    deep = photos.chelsea((32, 24)).astype(np.uint16) * 257
    deep[0, 0] = (1, 2, 3)  # values that exist only at 16 bits
    cv2.imwrite(str(root / "scans" / "deep.png"), deep[..., ::-1])
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(photos.astronaut((30, 20))).save(root / "scans" / "page.tif", icc_profile=srgb)
    # Junk that breaks other batch tools, and a file cut off halfway.
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(200))
    (root / "trip" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(500))
    (root / "trip" / "rotated.jpg.xmp").write_text('<x:xmpmeta xmlns:x="adobe:ns:meta/"></x:xmpmeta>')
    (root / "notes.txt").write_text("shot list\n")
    whole = (root / "portrait.png").read_bytes()
    (root / "trip" / "cut.png").write_bytes(whole[: len(whole) // 2])
    return {"portrait.png": (96, 96), "trip/rotated.jpg": (80, 120), "trip/day1/cat.webp": (108, 72),
            "trip/day1/logo.png": (80, 60), "scans/deep.png": (64, 48), "scans/page.png": (60, 40)}


def _outputs(root: Path) -> dict[str, float]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns for path in sorted(root.rglob("*")) if path.is_file()}


def test_a_folder_mirrors_its_tree_skips_junk_reports_failures_and_resumes(
        tmp_path: Path, weights_dir: Path) -> None:
    source, out, report = tmp_path / "photos", tmp_path / "big", tmp_path / "report.json"
    expected = _photo_folder(source)

    first = loupe("upscale", str(source), "-o", str(out), "--model", MODEL, "--scale", "2", "--report", str(report),
                  weights_dir=weights_dir, data_dir=tmp_path / "data")

    assert first.returncode == 1, first.stderr  # the cut-off PNG failed; everything else went on
    assert f"{source / 'trip' / 'cut.png'}: The image could not be decoded" in first.stderr
    written = _outputs(out)
    assert sorted(written) == sorted(expected)
    for name, size in expected.items():
        with Image.open(out / name) as image:
            assert image.size == size, name
    with Image.open(out / "trip" / "rotated.jpg") as rotated:  # upright, and the rest of its EXIF kept
        exif = rotated.getexif()
        assert exif.get(ExifTags.Base.Orientation, 1) == 1 and exif[ExifTags.Base.Make] == "LoupeCam"
    with Image.open(out / "trip" / "day1" / "logo.png") as logo:
        assert logo.mode == "RGBA" and logo.getextrema()[3][0] < 10 < 245 < logo.getextrema()[3][1]
    deep = cv2.imread(str(out / "scans" / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16 and np.any(deep % 257 != 0)
    with Image.open(out / "scans" / "page.png") as page:  # a TIFF comes back as PNG, its colour profile kept
        assert page.format == "PNG" and page.info.get("icc_profile")
        assert not {256, 257, 273, 279} & set(page.getexif())  # and none of the TIFF's own layout as EXIF

    records = {Path(r["path"]).relative_to(source).as_posix(): r for r in json.loads(report.read_text())["files"]}
    assert json.loads(report.read_text())["summary"] | {"seconds": 0, "images_per_second": 0} == {
        "files": 11, "upscaled": 6, "skipped": 4, "failed": 1, "interrupted": 0, "seconds": 0,
        "images_per_second": 0, "stopped": False}
    assert {name for name, r in records.items() if r["status"] == "skipped"} == {
        ".DS_Store", "notes.txt", "trip/Thumbs.db", "trip/rotated.jpg.xmp"}
    assert all(r["reason"] == "not an image" for r in records.values() if r["status"] == "skipped")
    assert records["trip/cut.png"]["status"] == "failed" and "truncated" in records["trip/cut.png"]["reason"]
    assert records["trip/rotated.jpg"] | {"seconds": 0} == {
        "path": str(source / "trip" / "rotated.jpg"), "output": str(out / "trip" / "rotated.jpg"),
        "status": "upscaled", "reason": None, "seconds": 0, "input_size": "40x60", "output_size": "80x120"}

    again = loupe("upscale", str(source), "-o", str(out), "--model", MODEL, "--scale", "2", "-q",
                  "--report", str(report), weights_dir=weights_dir, data_dir=tmp_path / "data")

    assert again.returncode == 1  # the broken file still fails; nothing else is redone
    assert _outputs(out) == written
    summary = json.loads(report.read_text())["summary"]
    assert (summary["upscaled"], summary["skipped"], summary["failed"]) == (0, 10, 1)


def test_format_and_size_apply_to_every_file_and_a_clean_batch_exits_0(tmp_path: Path, weights_dir: Path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    (source / "a").mkdir(parents=True)
    Image.fromarray(photos.astronaut((40, 30))).save(source / "a" / "one.png")
    Image.fromarray(photos.coffee((40, 30))).save(source / "two.jpg")

    result = loupe("upscale", str(source / "**" / "*.*"), "-o", str(out), "--model", MODEL, "--size", "100x75",
                   "--format", "webp", "--quality", "80", weights_dir=weights_dir, data_dir=tmp_path / "data")

    assert result.returncode == 0, result.stderr
    assert "2 upscaled" in result.stdout
    assert sorted(_outputs(out)) == ["a/one.webp", "two.webp"]
    for name in ("a/one.webp", "two.webp"):
        with Image.open(out / name) as image:
            assert image.format == "WEBP" and image.size == (100, 75)


def test_a_size_that_does_not_fit_a_file_fails_that_file_with_the_reason(tmp_path: Path, weights_dir: Path) -> None:
    source = tmp_path / "in"
    source.mkdir()
    Image.fromarray(photos.astronaut((40, 30))).save(source / "wide.png")
    Image.fromarray(photos.astronaut((30, 40))).save(source / "tall.png")

    result = loupe("upscale", str(source), "-o", str(tmp_path / "out"), "--model", MODEL, "--size", "80x60", "-q",
                   weights_dir=weights_dir, data_dir=tmp_path / "data")

    assert result.returncode == 1
    assert "tall.png: size 80x60 does not keep the input's aspect ratio (30x40)" in result.stderr
    assert sorted(_outputs(tmp_path / "out")) == ["wide.png"]


@pytest.mark.parametrize("args", [
    ["missing-folder", "-o", "out"],
    ["in/*.nothing", "-o", "out"],
    ["in", "-o", "out", "--scale", "0"],
    ["in", "-o", "out", "--scale", "2", "--size", "10x10"],
    ["in", "-o", "out", "--format", "bmp"],
    ["in", "-o", "out", "--model", "no-such-model"],
    ["in/one.png", "-o", "out.tif"],  # a format Loupe doesn't write
    ["in/one.png", "-o", "in/one.png"],  # the output is the input
    ["in", "-o", "in"],
    ["in", "-o", "."],  # the input inside the output
])
def test_usage_errors_exit_2_and_write_nothing(args: list[str], tmp_path: Path, weights_dir: Path) -> None:
    (tmp_path / "in").mkdir()
    Image.fromarray(photos.astronaut((16, 16))).save(tmp_path / "in" / "one.png")
    result = subprocess.run([sys.executable, "-m", "server.cli", "upscale", *args], cwd=tmp_path,
                            env={**_env(weights_dir, tmp_path / "data"), "PYTHONPATH": str(Path.cwd())},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip()
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_leaves_no_partial_file_and_the_next_run_resumes(
        tmp_path: Path, weights_dir: Path) -> None:
    source, out, report = tmp_path / "in", tmp_path / "out", tmp_path / "report.json"
    source.mkdir()
    names = [f"frame{index:02}.png" for index in range(8)]
    for index, name in enumerate(names):
        Image.fromarray(np.roll(photos.chelsea((160, 120)), index * 7, axis=1)).save(source / name)
    command = [sys.executable, "-m", "server.cli", "upscale", str(source), "-o", str(out), "--model", MODEL,
               "--report", str(report)]
    process = subprocess.Popen(command, env=_env(weights_dir, tmp_path / "data"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.exists() and any(path.suffix == ".png" for path in out.iterdir())):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "stopping" in stderr and "run it again to resume" in stdout
    done = sorted(path.name for path in out.iterdir())
    assert 1 <= len(done) < len(names)
    assert set(done) <= set(names)  # no temp file left behind, under any name
    for name in done:
        with Image.open(out / name) as image:
            image.load()  # whole, not cut off
            assert image.size == (640, 480)
    summary = json.loads(report.read_text())["summary"]
    assert summary["stopped"] and summary["upscaled"] == len(done) and summary["interrupted"] == len(names) - len(done)
    mtimes = _outputs(out)

    resumed = loupe("upscale", str(source), "-o", str(out), "--model", MODEL, "-q", weights_dir=weights_dir,
                    data_dir=tmp_path / "data")

    assert resumed.returncode == 0, resumed.stderr
    assert sorted(path.name for path in out.iterdir()) == names
    assert {name: mtime for name, mtime in _outputs(out).items() if name in mtimes} == mtimes


def test_discarding_the_files_in_flight_writes_none_of_them(tmp_path: Path, weights_dir: Path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for index in range(3):
        Image.fromarray(photos.coffee((96, 64))).save(source / f"{index}.png")
    settings = loupe_settings(weights_dir, tmp_path / "data", tile_size=16)  # many tiles: a cancel lands between two
    entry = catalog.find(MODEL)
    assert entry is not None
    items, refused = collect([str(source)], out, None)
    engine = LocalEngine(settings)  # one device: the files reach it one at a time, in their sorted order
    assert len(engine.devices) == 1
    # The second file's model run holds the device at its first report of tiles done (more are to come), until the
    # batch has been told to discard it: no guess at how long a file takes.
    on_device, discarded = threading.Event(), threading.Event()
    first_report: list[tuple[int, int]] = []
    runs = itertools.count()  # the device's model runs, one a file
    upscale_sync = engine.upscale_sync

    def held_upscale(*args: Any, progress: Callable[[int, int], None] | None = None, **kwargs: Any) -> Any:
        if next(runs) != 1:
            return upscale_sync(*args, progress=progress, **kwargs)

        def report(done: int, total: int) -> None:
            if progress is not None:  # the batch's own, should it watch
                progress(done, total)
            if done > 0 and not first_report:  # past (0, total), which only says the device took the job
                first_report.append((done, total))
                on_device.set()
                discarded.wait(120)

        return upscale_sync(*args, progress=report, **kwargs)

    engine.upscale_sync = held_upscale  # type: ignore[method-assign]
    batch = Batch(engine, settings, Options(entry, scale=2), items, refused)
    runner = threading.Thread(target=lambda: setattr(batch, "report", batch.run()))
    runner.start()
    try:
        assert on_device.wait(120), "the second file never reached the device"
        batch.stop(discard_running=True)
    finally:
        discarded.set()
        runner.join(120)
    assert not runner.is_alive()
    # The held run was mid-file: past its first batch of tiles, with a batch after the one in flight, so the
    # cancel is seen between two tiles.
    (done, total), = first_report
    assert 0 < done and 2 * done < total, first_report

    statuses = {Path(r.path).name: r.status for r in batch.report.files}
    assert set(statuses) == {"0.png", "1.png", "2.png"}
    assert "interrupted" in statuses.values() and set(statuses.values()) <= {"upscaled", "interrupted"}
    assert statuses == {"0.png": "upscaled", "1.png": "interrupted", "2.png": "interrupted"}
    in_flight = next(r for r in batch.report.files if Path(r.path).name == "1.png")
    assert in_flight.reason == "the batch was stopped; this file's work was discarded"
    written = sorted(path.name for path in out.rglob("*")) if out.exists() else []
    assert written == sorted(name for name, status in statuses.items() if status == "upscaled")


def test_one_file_with_an_output_path_keeps_working_as_before(tmp_path: Path, weights_dir: Path) -> None:
    source = tmp_path / "in.jpg"
    Image.fromarray(photos.astronaut((37, 23))).save(source)
    target = tmp_path / "out.webp"
    target.write_bytes(b"an older result")
    result = loupe("upscale", str(source), "-o", str(target), "--model", MODEL, "--scale", "1.37", "-q",
                   weights_dir=weights_dir, data_dir=tmp_path / "data")
    assert result.returncode == 0, result.stderr
    assert Image.open(target).size == (round(37 * 1.37), round(23 * 1.37))

    (tmp_path / "notes.txt").write_text("not an image")
    refused = loupe("upscale", str(tmp_path / "notes.txt"), "-o", str(tmp_path / "notes.png"), "--model", MODEL,
                    weights_dir=weights_dir, data_dir=tmp_path / "data")
    assert refused.returncode == 1 and "not an image in a supported format" in refused.stderr


# The input side alone: which files, which outputs.

def test_outputs_keep_names_and_formats_and_each_output_has_one_source(tmp_path: Path) -> None:
    source = tmp_path / "in"
    (source / "deep" / "er").mkdir(parents=True)
    for name in ("a.JPG", "b.jpeg", "c.gif", "c.png", "d.tif", "deep/er/e.webp", "frame.0001", ".DS_Store"):
        (source / name).write_bytes(b"")
    out = source / "upscaled"  # inside the input: never read back as an input
    out.mkdir()
    (out / "a.JPG").write_bytes(b"")

    items, refused = collect([str(source)], out, None)

    assert [(item.source.relative_to(source).as_posix(), item.output.relative_to(out).as_posix(), item.format)
            for item in items] == [
        (".DS_Store", ".DS_Store.png", "png"), ("a.JPG", "a.JPG", "jpeg"), ("b.jpeg", "b.jpeg", "jpeg"),
        ("c.png", "c.png", "png"), ("d.tif", "d.png", "png"), ("deep/er/e.webp", "deep/er/e.webp", "webp"),
        ("frame.0001", "frame.0001.png", "png")]
    # Of two files that would make one output, the one whose name it is keeps it; the other is refused.
    assert [(r.source.name, r.output.name) for r in refused] == [("c.gif", "c.png")]
    assert f"is also that of {source / 'c.png'}" in refused[0].reason
    forced, _ = collect([str(source / "deep")], tmp_path / "o", "avif")
    assert [item.output.relative_to(tmp_path / "o").as_posix() for item in forced] == ["er/e.avif"]


def test_images_are_told_from_junk_by_their_content() -> None:
    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, "PNG")
    assert is_image_like(png.getvalue()[:16])
    assert is_image_like(png.getvalue()[:12])  # a PNG cut off in its header is still a (broken) image
    assert is_image_like(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00")  # an image Loupe can't read: a failure
    for junk in (b"\x00\x00\x00\x01Bud1\x00\x00", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", b"shot list\n", b""):
        assert not is_image_like(junk)


class TwoDeviceEngine:
    """The slice of `LocalEngine` a batch uses, over two fake devices that resample instead of upscaling; a file
    whose first pixel is 7 fails on either, as a file can run a device out of memory.

    Both devices take files, and files finish out of order, by events rather than by speed: each device's first
    file waits until the other device holds one too, and cpu:1's first file ends only once cpu:0 has finished
    another file after its first."""

    devices = [torch.device("cpu", 0), torch.device("cpu", 1)]

    def __init__(self) -> None:
        self.ran_on: dict[int, torch.device] = {}
        self.lock = threading.Lock()
        self.taken = {0: 0, 1: 0}  # files each device has taken
        self.both_hold_one = threading.Barrier(2)
        self.overtaken = threading.Event()  # cpu:0 has finished its second file

    def unavailable_reason(self, entry: object) -> None:
        return None

    def plan(self, entry: object, picture: Picture, target: tuple[int, int], n: int = 1, *,
             device: torch.device) -> tuple[torch.device, tuple[int, int]]:
        return device, target

    def upscale_sync(self, plan: tuple[torch.device, tuple[int, int]], picture: Picture, *, seed: int | None,
                     cancel: threading.Event) -> list[Picture]:
        device, target = plan
        with self.lock:
            self.taken[device.index] += 1
            turn = self.taken[device.index]
            self.ran_on[int(picture.pixels[1, 1, 0])] = device
        try:
            if turn == 1:
                self.both_hold_one.wait(timeout=120)  # raises, failing this file, if the other device takes none
                if device.index == 1 and not self.overtaken.wait(timeout=120):
                    raise AssertionError("cpu:0 finished no second file")
            if picture.pixels[0, 0, 0] == 7:
                raise OutOfDeviceMemory("the fake device ran out of memory")
            return [Picture(resize(picture.pixels, *target))]
        finally:
            if device.index == 0 and turn == 2:
                self.overtaken.set()


def test_every_device_takes_files_and_every_file_ends_with_one_record(tmp_path: Path) -> None:
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for index in range(12):
        pixels = np.full((8, 10, 3), index * 20, np.uint8)
        pixels[0, 0, 0] = 7 if index == 5 else 0
        Image.fromarray(pixels).save(source / f"{index:02}.png")
    (source / "notes.txt").write_text("junk")
    settings = loupe_settings(Path("weights"), tmp_path / "data")
    items, refused = collect([str(source)], out, None)
    engine = TwoDeviceEngine()

    report = Batch(engine, settings, Options(catalog.find(MODEL), scale=2), items, refused).run()  # type: ignore[arg-type]

    assert [record.path for record in report.files] == sorted(str(item.source) for item in items)
    statuses = {Path(record.path).name: record.status for record in report.files}
    assert statuses.pop("notes.txt") == "skipped"
    assert len(engine.ran_on) == 12 and set(engine.ran_on.values()) == set(TwoDeviceEngine.devices)
    assert [name for name, status in statuses.items() if status != "upscaled"] == ["05.png"]
    assert "ran out of memory" in next(r.reason for r in report.files if r.path.endswith("05.png"))
    assert sorted(path.name for path in out.iterdir()) == sorted(f"{i:02}.png" for i in range(12) if i != 5)
    assert (report.summary.upscaled, report.summary.failed, report.summary.files) == (11, 1, 13)
