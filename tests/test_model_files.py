"""Files in `weights/custom/` that are not what they seem, against a real `loupe serve`: a FIFO, a device, a folder,
a zip bomb, a name that isn't UTF-8. Listing them never hangs, never exhausts a thread pool, never answers 500,
costs no more memory than the files hold, and shows no server path."""
from __future__ import annotations

import io
import os
import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import REAL_WEIGHTS
from tests.processes import loupe_env, loupe_serve, png

BOMB_BYTES = 1 << 30  # what the bomb's one record inflates to; its file is about a thousandth of that


def _zip_bomb(path: Path) -> None:
    """A torch archive whose storage record is 1 GiB of deflated zeros: torch would inflate it whole to read it."""
    saved = io.BytesIO()
    torch.save({"weight": torch.zeros(4)}, saved)
    with zipfile.ZipFile(io.BytesIO(saved.getvalue())) as source, zipfile.ZipFile(path, "w") as bomb:
        for record in source.infolist():
            if not record.filename.endswith("/data/0"):
                bomb.writestr(record, source.read(record.filename))
                continue
            inflated = zipfile.ZipInfo(record.filename)
            inflated.compress_type = zipfile.ZIP_DEFLATED
            with bomb.open(inflated, "w", force_zip64=True) as sink:
                for _ in range(BOMB_BYTES >> 20):
                    sink.write(b"\0" * (1 << 20))


def _peak_rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


@pytest.fixture
def odd_weights(tmp_path: Path, weights_dir: Path) -> Path:
    """The real weights, and a custom folder of odd files beside one good model."""
    weights = tmp_path / "weights"
    custom = weights / "custom"
    custom.mkdir(parents=True)
    for name in os.listdir(weights_dir):
        if name.endswith(".safetensors") and any(name.startswith(weight) for weight in REAL_WEIGHTS):
            (weights / name).symlink_to(weights_dir / name)
    from tests.test_custom_models import NETWORKS, save

    save(NETWORKS["span-2x"](), custom / "good.safetensors")
    os.mkfifo(custom / "fifo.pth")
    (custom / "device.safetensors").symlink_to("/dev/zero")
    (custom / "folder.pth").mkdir()
    _zip_bomb(custom / "bomb.pth")
    (custom / os.fsdecode(b"caf\xe9-latin1.safetensors")).write_bytes((custom / "good.safetensors").read_bytes())
    return weights


def test_odd_files_are_listed_with_their_reason_and_hold_nothing_up(tmp_path: Path, odd_weights: Path) -> None:
    env = loupe_env(odd_weights, tmp_path / "data")
    with loupe_serve(env, tmp_path / "loupe.log") as served, httpx.Client(base_url=served.url, timeout=60) as client:
        baseline = _peak_rss_bytes(served.process.pid)

        def listing(_: int) -> httpx.Response:
            return client.get("/v1/models")

        with ThreadPoolExecutor(12) as pool:
            listings = list(pool.map(listing, range(12)))
            # While they run: a built-in edit, the requests API and readiness all answer.
            edit = client.post("/v1/images/edits", data={"model": "realesr-animevideov3", "scale_factor": "2"},
                               files={"image": ("a.png", png())})
            requests = client.get("/v1/requests")
            ready = client.get("/readyz")
        assert [answer.status_code for answer in listings] == [200] * 12
        assert (edit.status_code, requests.status_code, ready.status_code) == (200, 200, 200), ready.text

        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        assert cards["good"]["runnable"]
        for name in ("fifo", "device", "folder"):
            assert not cards[name]["runnable"] and "not a regular file" in cards[name]["local"]["reason"], name
        assert not cards["bomb"]["runnable"] and "zip bomb" in cards["bomb"]["local"]["reason"]
        assert not any(name.startswith("caf") for name in cards)  # its name can't be a model id: skipped
        refused = client.post("/v1/images/edits", data={"model": "fifo"}, files={"image": ("a.png", png())})
        assert (refused.status_code, refused.headers["x-should-retry"]) == (503, "false")
        text = client.get("/v1/models").text + client.get("/readyz").text + refused.text
        assert str(tmp_path) not in text and str(odd_weights) not in text
        assert _peak_rss_bytes(served.process.pid) - baseline < BOMB_BYTES // 4  # the bomb was never inflated
    log = served.log_text()
    assert "not valid UTF-8" in log and "caf\\\\xe9-latin1.safetensors" in log
    assert "Traceback" not in log


def test_reasons_name_files_under_the_weights_folder_never_server_paths(tmp_path: Path) -> None:
    weights = tmp_path / "server-layout" / "weights"
    (weights / "custom").mkdir(parents=True)
    (weights / "custom" / "half.safetensors").write_bytes(b"\0" * 100)
    env = loupe_env(weights, tmp_path / "data")
    with loupe_serve(env, tmp_path / "loupe.log") as served:
        listed = httpx.get(f"{served.url}/v1/models", timeout=60)
        missing = httpx.post(f"{served.url}/v1/images/edits", data={"model": "realesrgan-x4plus"},
                             files={"image": ("a.png", png())}, timeout=60)
        ready = httpx.get(f"{served.url}/readyz", timeout=60)
    cards = {card["id"]: card for card in listed.json()["data"]}
    assert "LOUPE_WEIGHTS_DIR" in cards["realesrgan-x4plus"]["local"]["reason"]
    assert "half.safetensors" in cards["half"]["local"]["reason"]
    assert missing.status_code == 503 and "LOUPE_WEIGHTS_DIR" in missing.json()["error"]["message"]
    for text in (listed.text, missing.text, ready.text):
        assert str(tmp_path) not in text and "server-layout" not in text


def test_weights_add_copies_regular_files_only(tmp_path: Path) -> None:
    from server.engine import custom
    from server.engine.weights import WeightsError

    os.mkfifo(tmp_path / "fifo.pth")
    (tmp_path / "zero.pth").symlink_to("/dev/zero")
    for source in ("fifo.pth", "zero.pth"):
        with pytest.raises(WeightsError, match="not a regular file"):
            custom.add(str(tmp_path / source), tmp_path / "weights", max_bytes=1 << 20)
    assert not (tmp_path / "weights" / "custom").exists() or not any((tmp_path / "weights" / "custom").iterdir())
