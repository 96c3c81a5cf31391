"""Result files: written atomically under unguessable names, gone after their time to live.

A result is visible under its final name only once it is complete (temp file in the
same directory, fsync, rename), and it expires by its mtime even before a sweep deletes it.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import tempfile
import time
from pathlib import Path
from stat import S_ISREG

from server.errors import StorageFull, Unavailable
from server.jobs import EXTENSIONS, OutputFormat, media_type

log = logging.getLogger("loupe.storage")

_FORMAT_OF_EXTENSION = {extension: fmt for fmt, extension in EXTENSIONS.items()}
_NAME = re.compile(r"[0-9a-f]{32}\.(" + "|".join(sorted(_FORMAT_OF_EXTENSION)) + r")")
_TEMP_PREFIX = ".partial-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_UMASK = os.umask(0)
os.umask(_UMASK)


class ResultStore:
    def __init__(self, root: Path, ttl_s: int) -> None:
        self.root = root
        self.ttl_s = ttl_s

    def save(self, data: bytes, fmt: OutputFormat) -> str:
        """Store one result; its name, e.g. "3f2a…c1.png". StorageFull (507) or Unavailable (503) when the disk refuses."""
        if fmt not in EXTENSIONS:
            raise ValueError(f"no result format {fmt!r}; known: {sorted(EXTENSIONS)}")
        extension = EXTENSIONS[fmt]
        name = f"{secrets.token_hex(16)}.{extension}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_atomically(self.root / name, data)
        except OSError as error:
            log.error("could not store a result", extra={"directory": str(self.root), "error": str(error)})
            if error.errno in _DISK_FULL:
                raise StorageFull("the server's result storage is full; try again later or ask for b64_json") from None
            raise Unavailable("the server could not store the result; ask for b64_json or tell the operator",
                              code="STORAGE_UNAVAILABLE", transient=False) from None
        return name

    def open(self, name: str) -> tuple[Path, str] | None:
        """The file and media type of a live result; None for an unknown, expired or impossible name."""
        match = _NAME.fullmatch(name)
        if match is None:
            return None
        path = self.root / name
        try:
            info = path.stat()
        except OSError:
            return None
        if not S_ISREG(info.st_mode) or self._expired(info.st_mtime, time.time()):
            return None
        return path, media_type(_FORMAT_OF_EXTENSION[match.group(1)])

    def sweep(self) -> int:
        """Delete expired results (and temp files a crash left behind); how many were deleted."""
        now = time.time()
        deleted = 0
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not (_NAME.fullmatch(entry.name) or entry.name.startswith(_TEMP_PREFIX)):
                continue
            try:
                if self._expired(entry.stat().st_mtime, now):
                    os.unlink(entry.path)
                    deleted += 1
            except FileNotFoundError:
                continue
            except OSError as error:
                log.warning("could not delete an expired result", extra={"path": entry.path, "error": str(error)})
        return deleted

    def _expired(self, mtime: float, now: float) -> bool:
        return now >= mtime + self.ttl_s


def write_atomically(final: Path, data: bytes, *, durable: bool = True) -> None:
    """`data` under `final` whole or not at all: a temp file beside it, renamed over it. `durable`: fsynced, file
    and folder, so that it survives a power cut too, not only the process's end."""
    descriptor, temp = tempfile.mkstemp(dir=final.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(file.fileno(), 0o666 & ~_UMASK)  # what a plain open() would give, not mkstemp's 0600
            file.write(data)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.replace(temp, final)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    if not durable:
        return
    folder = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)
