"""Result storage: atomic writes, unguessable names, expiry, and failures confined to one request."""
from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import pytest

from server.api.errors import retryable, status_of
from server.errors import LoupeError
from server.storage import ResultStore

TTL = 600


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(tmp_path / "results", TTL)


def _age(store: ResultStore, name: str, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(store.root / name, (past, past))


def test_saved_result_opens_with_its_media_type(store: ResultStore) -> None:
    for fmt, extension, media_type in [("png", "png", "image/png"), ("jpeg", "jpg", "image/jpeg"),
                                       ("webp", "webp", "image/webp"), ("gif", "gif", "image/gif"),
                                       ("avif", "avif", "image/avif")]:
        name = store.save(b"picture " + fmt.encode(), fmt)
        assert name.endswith("." + extension)
        found = store.open(name)
        assert found is not None
        path, served_type = found
        assert (path.read_bytes(), served_type) == (b"picture " + fmt.encode(), media_type)


def test_names_are_unguessable(store: ResultStore) -> None:
    names = {store.save(b"same bytes", "png") for _ in range(50)}
    assert len(names) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}\.png", name) for name in names)


def test_no_partial_file_is_visible_while_writing(store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    seen_during_write: list[list[str]] = []
    real_fsync = os.fsync

    def watching_fsync(descriptor: int) -> None:
        seen_during_write.append(sorted(os.listdir(store.root)))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", watching_fsync)
    name = store.save(b"x" * 100_000, "png")
    listing = seen_during_write[0]  # at the data's fsync; the second is the folder's, after the rename
    assert name not in listing
    assert all(store.open(entry) is None for entry in listing)
    assert os.listdir(store.root) == [name]


def test_crash_mid_write_leaves_nothing_behind(store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    store.save(b"an earlier result", "png")
    before = sorted(os.listdir(store.root))

    def crash(source: str, destination: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save(b"half written", "png")
    assert sorted(os.listdir(store.root)) == before


def test_full_disk_is_a_507_for_that_request_only(store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(descriptor: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full)
        with pytest.raises(LoupeError) as caught:
            store.save(b"result", "png")
    assert (status_of(caught.value), caught.value.code) == (507, "STORAGE_UNAVAILABLE")
    assert "full" in caught.value.message
    assert os.listdir(store.root) == []
    assert store.open(store.save(b"result", "png")) is not None


def test_unwritable_directory_is_a_503_that_wont_clear_for_that_request_only(tmp_path: Path) -> None:
    # A file where the directory should be refuses writes even to root, unlike chmod.
    blocker = tmp_path / "data"
    blocker.write_bytes(b"not a directory")
    store = ResultStore(blocker / "results", TTL)
    with pytest.raises(LoupeError) as caught:
        store.save(b"result", "png")
    assert (status_of(caught.value), caught.value.code) == (503, "STORAGE_UNAVAILABLE")
    assert not retryable(caught.value)  # the operator must fix it; retrying won't
    assert str(blocker) not in caught.value.message
    blocker.unlink()
    assert store.open(store.save(b"result", "png")) is not None


def test_expired_results_are_gone_before_the_sweep(store: ResultStore) -> None:
    old = store.save(b"old", "png")
    fresh = store.save(b"fresh", "png")
    _age(store, old, TTL + 1)
    _age(store, fresh, TTL - 60)
    assert store.open(old) is None
    assert store.open(fresh) is not None


def test_sweep_deletes_expired_results_and_crash_leftovers(store: ResultStore) -> None:
    old = store.save(b"old", "png")
    fresh = store.save(b"fresh", "webp")
    leftover = store.root / ".partial-abc123"
    leftover.write_bytes(b"half")
    stranger = store.root / "README"
    stranger.write_bytes(b"not ours")
    for name in (old, leftover.name, stranger.name):
        _age(store, name, TTL + 1)
    assert store.sweep() == 2
    assert sorted(os.listdir(store.root)) == sorted([fresh, "README"])
    assert store.sweep() == 0


def test_sweep_before_anything_was_saved(store: ResultStore) -> None:
    assert store.sweep() == 0


@pytest.mark.parametrize("name", [
    "../secret.png", "..", ".", "", "/etc/passwd", "a/b.png", "results/x.png",
    "0123456789abcdef0123456789ABCDEF.png",  # uppercase: never made
    "0123456789abcdef0123456789abcdef.exe",
    "0123456789abcdef0123456789abcdef.png/..",
    "0123456789abcdef0123456789abcdef.png\x00",
    "0123456789abcdef0123456789abcde.png",
    "..%2f0123456789abcdef0123456789abcdef.png",
    ".partial-abc123",
])
def test_only_names_the_store_makes_are_opened(store: ResultStore, tmp_path: Path, name: str) -> None:
    store.save(b"something", "png")
    (tmp_path / "secret.png").write_bytes(b"outside the store")
    (store.root / ".partial-abc123").write_bytes(b"half")
    assert store.open(name) is None


def test_a_file_outside_the_store_is_not_reachable(store: ResultStore, tmp_path: Path) -> None:
    name = "0123456789abcdef0123456789abcdef.png"
    (tmp_path / name).write_bytes(b"outside")
    store.save(b"inside", "png")
    assert store.open(f"../{name}") is None
    assert store.open(name) is None


def test_unknown_format_is_a_programming_error(store: ResultStore) -> None:
    with pytest.raises(ValueError):
        store.save(b"x", "bmp")
