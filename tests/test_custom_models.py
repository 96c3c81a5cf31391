"""Custom models: files dropped into `weights/custom/`, served like the built-ins.

Random-weight networks of six architecture families (and a 1-channel and a 1x one), each saved as safetensors
and as a .pth, run through HTTP with the openai SDK, tiled, against spandrel's own fp32 full-frame output.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import spandrel
import torch
from PIL import Image
from safetensors.torch import save_file
from spandrel.architectures.Compact import Compact
from spandrel.architectures.DAT import DAT
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.HAT import HAT
from spandrel.architectures.LaMa import LaMa
from spandrel.architectures.SPAN import SPAN
from spandrel.architectures.SwinIR import SwinIR

from server.config import PROJECT_ROOT
from tests import photos
from tests.conftest import loupe_settings
from tests.servers import serve

NETWORKS: dict[str, Callable[[], torch.nn.Module]] = {
    "esrgan-2x": lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=2),
    "esrgan-8x": lambda: ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=8),
    "esrgan-luma-2x": lambda: ESRGAN(in_nc=1, out_nc=1, num_filters=16, num_blocks=1, scale=2),
    "compact-1x": lambda: Compact(num_in_ch=3, num_out_ch=3, num_feat=16, num_conv=2, upscale=1),
    "swinir-2x": lambda: SwinIR(upscale=2, img_size=32, window_size=8, embed_dim=24, depths=[2], num_heads=[2],
                                upsampler="pixelshuffledirect"),
    "hat-2x": lambda: HAT(upscale=2, img_size=32, window_size=8, embed_dim=24, depths=[2], num_heads=[2],
                          compress_ratio=3, squeeze_factor=6, upsampler="pixelshuffle"),
    "dat-2x": lambda: DAT(upscale=2, img_size=32, embed_dim=24, depth=[2], num_heads=[2], split_size=[2, 4],
                          expansion_factor=2, upsampler="pixelshuffle"),
    "span-2x": lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=16, upscale=2),
}
FORMATS = ("safetensors", "pth")


def save(network: torch.nn.Module, path: Path) -> None:
    state = {key: value.contiguous() for key, value in network.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.fixture(scope="module")
def custom_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights dir whose custom folder holds every network, in both formats."""
    weights = tmp_path_factory.mktemp("weights")
    (weights / "custom").mkdir()
    torch.manual_seed(0)
    for name, build in NETWORKS.items():
        network = build()
        for fmt in FORMATS:
            save(network, weights / "custom" / f"{name}-{fmt}.{fmt}")
    return weights


@pytest.fixture(scope="module")
def custom_url(custom_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from server.app import create_app

    settings = loupe_settings(custom_weights, tmp_path_factory.mktemp("data"), precision="fp32", tile_size=32)
    with serve(create_app(settings)) as url:
        yield url


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upscale(url: str, model: str, image: bytes, scale: float) -> np.ndarray:
    result = sdk(url).images.edit(model=model, image=("in.png", image), prompt="x", response_format="b64_json",
                                  extra_body={"scale_factor": scale})
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or ""))))


def reference(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Spandrel's own fp32 full-frame output, nothing of Loupe's."""
    model = spandrel.ModelLoader().load_from_file(str(path)).eval()
    planes = pixels[..., None] if pixels.ndim == 2 else pixels
    tensor = torch.from_numpy(planes.astype(np.float32) / 255).permute(2, 0, 1)[None]
    with torch.inference_mode():
        output = model.model(tensor)[0].permute(1, 2, 0).clamp(0, 1).numpy()
    out = np.rint(output * 255).astype(np.uint8)
    return out[..., 0] if pixels.ndim == 2 else out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_a_custom_model_runs_tiled_through_http_as_spandrel_runs_it(custom_url: str, custom_weights: Path,
                                                                     name: str, fmt: str) -> None:
    model = f"{name}-{fmt}"
    card = sdk(custom_url).models.retrieve(model).model_dump()
    assert card["runnable"] and card["local"]["precision"] == "fp32", card
    luma = "luma" in name
    pixels = photos.coffee((96, 64))
    if luma:  # a gray picture: the luminance is the picture
        pixels = np.asarray(Image.fromarray(pixels).convert("L"))
    scale = card["default_scale"]
    got = upscale(custom_url, model, png(Image.fromarray(pixels)), scale)
    expected = reference(custom_weights / "custom" / f"{model}.{fmt}", pixels)
    assert got.shape == expected.shape
    assert psnr(got, expected) >= 45


@pytest.mark.slow
@pytest.mark.parametrize("name", ["esrgan-2x", "esrgan-luma-2x", "compact-1x", "swinir-2x"])
def test_a_custom_model_makes_any_scale_exactly(custom_url: str, name: str) -> None:
    got = upscale(custom_url, f"{name}-safetensors", png(Image.fromarray(photos.chelsea((50, 30)))), 1.7)
    assert got.shape[:2] == (51, 85) and got.shape[2] == 3  # colour back from a luminance model too


def test_the_listing_says_what_each_file_is(custom_url: str) -> None:
    cards = {card.id: card.model_dump() for card in sdk(custom_url).models.list()}
    swinir = cards["swinir-2x-pth"]
    assert (swinir["owned_by"], swinir["default_scale"], swinir["where"]) == ("custom", 2, "local")
    assert swinir["local"]["architecture"] == "SwinIR" and swinir["local"]["parameters"] > 0
    assert cards["esrgan-luma-2x-safetensors"]["local"]["channels"] == 1
    assert cards["compact-1x-pth"]["default_scale"] == 1
    planned = httpx.post(f"{custom_url}/v1/images/edits?dryRun=true", data={"model": "dat-2x-pth", "scale_factor": "3"},
                         files={"image": ("a.png", png(Image.fromarray(photos.coffee((64, 48)))))}).json()
    # 3x from a 2x network: two passes, then the resample
    assert planned["executed_model"] == "local/custom/dat-2x-pth+custom/dat-2x-pth" and planned["size"] == "192x144"


# Bad files


def test_bad_files_are_listed_with_their_reason_and_refused_without_harm(tmp_path: Path) -> None:
    from server.app import create_app

    weights = tmp_path / "weights"
    folder = weights / "custom"
    folder.mkdir(parents=True)
    save(NETWORKS["esrgan-2x"](), folder / "whole.safetensors")
    (folder / "half.safetensors").write_bytes((folder / "whole.safetensors").read_bytes()[:3000])
    (folder / "noise.pth").write_bytes(np.random.default_rng(0).bytes(5000))
    shutil.copy(folder / "whole.safetensors", folder / "realesrgan-x4plus.safetensors")
    save(LaMa().half(), folder / "inpaint.safetensors")
    with serve(create_app(loupe_settings(weights, tmp_path / "data"))) as url:
        cards = {card.id: card.model_dump() for card in sdk(url).models.list()}
        refused = {name: cards[name]["local"]["reason"] for name in ("half", "noise", "inpaint")}
        assert cards["whole"]["runnable"] and not any(cards[name]["runnable"] for name in refused)
        assert "spandrel can't load" in refused["half"] and "spandrel can't load" in refused["noise"]
        assert "Inpainting" in refused["inpaint"] and "not an upscaler" in refused["inpaint"]
        clash = [c for c in cards.values() if (c["local"] or {}).get("file") == "realesrgan-x4plus.safetensors"]
        assert "taken by a built-in model" in clash[0]["local"]["reason"]
        with pytest.raises(openai.APIStatusError) as caught:
            upscale(url, "half", png(Image.fromarray(photos.coffee((16, 16)))), 2)
        assert caught.value.status_code == 503 and caught.value.response.headers["x-should-retry"] == "false"
        assert upscale(url, "whole", png(Image.fromarray(photos.coffee((16, 16)))), 2).shape == (32, 32, 3)


class _Payload:
    """Unpickling this calls `open(marker, "w")`: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def test_a_pickle_that_would_run_code_is_refused_and_never_run(tmp_path: Path) -> None:
    from server.app import create_app

    marker = tmp_path / "pwned"
    weights = tmp_path / "weights"
    (weights / "custom").mkdir(parents=True)
    evil = tmp_path / "evil.pth"
    torch.save({"params": _Payload(marker)}, evil)
    assert not marker.exists()
    shutil.copy(evil, weights / "custom" / "evil.pth")
    with serve(create_app(loupe_settings(weights, tmp_path / "data"))) as url:
        card = sdk(url).models.retrieve("evil").model_dump()
    assert not card["runnable"] and "spandrel can't load" in card["local"]["reason"]
    added = subprocess.run([sys.executable, "-m", "server.cli", "weights", "add", str(evil), "--name", "evil2"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, env=_env(weights, tmp_path))
    assert added.returncode != 0 and "was not added" in added.stderr
    assert not marker.exists()
    assert sorted(p.name for p in (weights / "custom").iterdir()) == ["evil.pth"]  # nothing of evil2 left


@pytest.mark.parametrize("suffix", [".pth", ".pt"])
def test_a_torchscript_archive_is_refused_unrun(tmp_path: Path, suffix: str) -> None:
    """TorchScript carries code (spandrel itself would run it): only tensors are ever read from a pickle."""
    from server.engine import custom

    weights = tmp_path / "weights"
    (weights / "custom").mkdir(parents=True)
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(3, 3, 3)), str(weights / "custom" / f"scripted{suffix}"))
    (found,) = custom.scan(weights, set())
    assert found.reason is not None and "spandrel can't load" in found.reason


def _env(weights: Path, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LOUPE_WEIGHTS_DIR": str(weights), "LOUPE_DATA_DIR": str(tmp_path / "data"),
            "LOUPE_DEVICE": "cpu"}


def test_weights_add_verifies_copies_and_lists_a_file(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    source = tmp_path / "4x-Community.pth"
    save(NETWORKS["esrgan-2x"](), source)
    added = subprocess.run([sys.executable, "-m", "server.cli", "weights", "add", str(source)], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, env=_env(weights, tmp_path))
    assert added.returncode == 0, added.stderr
    assert "added 4x-Community: ESRGAN x2" in added.stdout
    assert (weights / "custom" / "4x-Community.pth").read_bytes() == source.read_bytes()
    listed = subprocess.run([sys.executable, "-m", "server.cli", "weights", "list"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, env=_env(weights, tmp_path))
    assert "custom/4x-Community" in listed.stdout and "custom: ESRGAN x2" in listed.stdout
    Image.fromarray(photos.coffee((20, 10))).save(tmp_path / "in.png")
    ran = subprocess.run([sys.executable, "-m", "server.cli", "upscale", str(tmp_path / "in.png"), "-o",
                          str(tmp_path / "out.png"), "--model", "4x-Community", "--scale", "3", "-q"],
                         cwd=PROJECT_ROOT, capture_output=True, text=True, env=_env(weights, tmp_path))
    assert ran.returncode == 0, ran.stderr
    assert Image.open(tmp_path / "out.png").size == (60, 30)


def test_a_file_dropped_in_or_removed_shows_without_a_restart(tmp_path: Path) -> None:
    from server.app import create_app

    weights = tmp_path / "weights"
    (weights / "custom").mkdir(parents=True)
    image = png(Image.fromarray(photos.coffee((24, 16))))
    with serve(create_app(loupe_settings(weights, tmp_path / "data"))) as url:
        assert "hot" not in {card.id for card in sdk(url).models.list()}
        save(NETWORKS["span-2x"](), weights / "custom" / "hot.safetensors")
        assert "hot" in {card.id for card in sdk(url).models.list()}
        first = upscale(url, "hot", image, 2)
        assert first.shape == (32, 48, 3)
        # Its network was measured on first load, and the measurement kept for the next start.
        measured = json.loads((tmp_path / "data" / "profiles.json").read_text())
        assert any(key.startswith("SPAN/x2/") and value["activations"] > 0 for key, value in measured.items())
        replacement = NETWORKS["span-2x"]()
        with torch.no_grad():
            for parameter in replacement.parameters():
                parameter.mul_(-3)
        save(replacement, weights / "custom" / "hot.safetensors")  # same name, another network: it is reloaded
        assert not np.array_equal(upscale(url, "hot", image, 2), first)
        (weights / "custom" / "hot.safetensors").unlink()
        assert "hot" not in {card.id for card in sdk(url).models.list()}
        with pytest.raises(openai.NotFoundError):
            upscale(url, "hot", image, 2)


def test_a_whole_pickled_module_is_refused_with_what_it_holds(tmp_path: Path) -> None:
    from server.engine import custom

    weights = tmp_path / "weights"
    (weights / "custom").mkdir(parents=True)
    torch.save(NETWORKS["compact-1x"](), weights / "custom" / "module.pth")  # the class, not only its tensors
    (found,) = custom.scan(weights, set())
    assert found.reason is not None and "holds more than tensors" in found.reason and "Compact" in found.reason
