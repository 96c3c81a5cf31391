"""Folder batches: `loupe upscale INPUT... -o OUT`, a bounded pipeline over the engine's devices.

    read (bytes, header, Job, decode) ─► run (one runner per device) ─► write (encode, temp file, rename)

Each stage is a set of threads (as many as there are devices) joined to the next by a queue holding one
picture per device, so a batch holds a few pictures at most, and one file's decode and encode overlap
another's model run. The steps of each file are the ones HTTP takes (`imagework`, `resolve_target`,
`local_blocker`, `LocalEngine.plan` / `upscale_sync`).

The steps of one file are `FileWork`'s, apart from the pipeline, so that any other scheduler of files (the
Ray Data batch) calls the same ones and makes the same records.

`stop()` (the first Ctrl-C) starts no new file and discards the decoded ones waiting; the files on a
device finish and are written. `stop(discard_running=True)` (the second) cancels those too, at their next
tile. Either way no output is ever half-written: each is a temp file renamed into place.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, TypeVar

import torch
from pydantic import BaseModel, field_validator

from server import imagework
from server.catalog import ModelEntry
from server.config import Settings
from server.engine.runtime import LocalEngine
from server.errors import Cancelled, InvalidInput, LoupeError
from server.folders import Item, Refused, is_image_like, shown
from server.imaging import Picture
from server.jobs import Job, SourceImage, resolve_target
from server.routing import local_blocker
from server.storage import write_atomically

log = logging.getLogger("loupe.batch")
T = TypeVar("T")

Status = Literal["upscaled", "skipped", "failed", "interrupted"]


class Record(BaseModel):
    """What became of one file: a line of the report."""

    path: str
    output: str | None
    status: Status
    reason: str | None = None
    seconds: float = 0.0  # of work on it: decode, model, encode and write, without waiting in queues
    input_size: str | None = None  # "WxH"
    output_size: str | None = None

    @field_validator("path", "output", "reason", mode="before")
    @classmethod
    def _printable(cls, value: object) -> object:
        return shown(value) if isinstance(value, (str, Path)) else value


class Summary(BaseModel):
    files: int
    upscaled: int
    skipped: int
    failed: int
    interrupted: int
    seconds: float
    images_per_second: float
    stopped: bool  # by a signal, before every file was done


class Report(BaseModel):
    summary: Summary
    files: list[Record]


@dataclass(frozen=True)
class Options:
    """What to make of every file: `loupe upscale`'s flags."""

    entry: ModelEntry
    scale: float | None = None  # None, without a size: the model's default scale
    size: tuple[int, int] | None = None
    quality: int | None = None
    seed: int | None = None
    overwrite: bool = False
    skip_non_images: bool = True  # a single named file that isn't an image is a failure, not a skip


@dataclass
class Loaded:
    """A file read and decoded, with its job; `seconds` of work so far."""

    item: Item
    job: Job
    picture: Picture
    seconds: float


@dataclass
class Upscaled:
    """A file's results, not yet written."""

    loaded: Loaded
    pictures: list[Picture]
    seconds: float


_HEAD_BYTES = 16  # enough for every signature in folders.is_image_like


class FileWork:
    """The steps of one file: load (read, probe, plan the job, decode), run (on a device), save (encode, write).

    Each step either hands on its result or ends the file with its `Record`; `guarded` turns whatever a step
    raises into that file's record, so that one file's failure never stops the others.
    """

    def __init__(self, engine: LocalEngine, settings: Settings, options: Options,
                 cancel: threading.Event | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.options = options
        self.cancel = cancel or threading.Event()  # handed to each model run: it stops at the next tile

    def load(self, item: Item) -> Loaded | Record:
        began = time.monotonic()
        with item.source.open("rb") as file:
            head = file.read(_HEAD_BYTES)
            if self.options.skip_non_images and not is_image_like(head):
                return _not_an_image(item)
            data = head + file.read()
        return self.prepare(item, data, began)

    def prepare(self, item: Item, data: bytes, began: float) -> Loaded | Record:
        """The file's bytes, read since `began`, to its job and decoded picture."""
        if self.options.skip_non_images and not is_image_like(data[:_HEAD_BYTES]):
            return _not_an_image(item)
        max_pixels = self.settings.max_input_pixels
        source = imagework.source_image(data, item.source.name, max_pixels)
        job = self._job(item, source)
        blocker = local_blocker(job, self.settings, self.engine)
        if blocker is not None:
            raise blocker
        picture = imagework.decode(source, max_pixels)
        job = replace(job, image=replace(source, data=b""))  # the bytes are done with
        return Loaded(item, job, picture, time.monotonic() - began)

    def _job(self, item: Item, source: SourceImage) -> Job:
        options = self.options
        scale, target = resolve_target(options.entry, source.width, source.height, options.scale, options.size)
        return Job(request_id=f"batch:{item.source}", requested_model=options.entry.id, entry=options.entry,
                   image=source, scale=scale, target=target, output_format=item.format,
                   output_compression=options.quality, seed=options.seed, scale_given=options.scale is not None,
                   size_given=f"{options.size[0]}x{options.size[1]}" if options.size else None)

    def run(self, loaded: Loaded, device: torch.device) -> Upscaled:
        began = time.monotonic()
        job = loaded.job
        plan = self.engine.plan(job.entry, loaded.picture, job.target, job.n, device=device)
        pictures = self.engine.upscale_sync(plan, loaded.picture, seed=job.seed, cancel=self.cancel)
        return Upscaled(loaded, pictures, loaded.seconds + time.monotonic() - began)

    def save(self, result: Upscaled) -> Record:
        began = time.monotonic()
        loaded = result.loaded
        job, item = loaded.job, loaded.item
        (picture,) = result.pictures  # a batch makes one image per file
        (data,) = imagework.encode([picture], job.output_format, job.output_compression)
        item.output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(item.output, data)
        return Record(path=str(item.source), output=str(item.output), status="upscaled",
                      seconds=round(result.seconds + time.monotonic() - began, 3),
                      input_size=f"{job.image.width}x{job.image.height}",
                      output_size=f"{picture.width}x{picture.height}")

    def whole(self, item: Item, data: bytes, device: torch.device) -> Record:
        """Every step of one file read elsewhere (the Ray Data batch): prepare, run, save, each guarded."""
        began = time.monotonic()
        loaded = guarded(item, lambda: self.prepare(item, data, began))
        if isinstance(loaded, Record):
            return loaded
        result = guarded(item, lambda: self.run(loaded, device), loaded.seconds)
        if isinstance(result, Record):
            return result
        return guarded(item, lambda: self.save(result), result.seconds)


def guarded(item: Item, step: Callable[[], T], seconds: float = 0.0) -> T | Record:
    """`step()`, for `item`, which has had `seconds` of work so far; or the record of how it failed."""
    began = time.monotonic()
    try:
        return step()
    except Cancelled:
        return interrupted(item, seconds + time.monotonic() - began)
    except (LoupeError, OSError) as error:
        reason = error.message if isinstance(error, LoupeError) else f"{error.strerror or error}"
        if isinstance(error, InvalidInput) and error.code == "IMAGE_TOO_LARGE":
            reason += " (raise LOUPE_MAX_INPUT_PIXELS for larger inputs)"
        return failed(item, reason, seconds + time.monotonic() - began)
    except Exception as error:  # a fault nobody foresaw: the file fails with it, the others go on
        log.exception("upscaling %s failed", item.source)
        return failed(item, f"{type(error).__name__}: {error}", seconds + time.monotonic() - began)


def set_aside(items: Sequence[Item], refused: Sequence[Refused], options: Options) -> tuple[list[Record], list[Item]]:
    """The records of the files that need no run (refused, or whose output is there and may stay), and the files
    that do."""
    records = [Record(path=str(refusal.source), output=str(refusal.output) if refusal.output else None,
                      status="failed", reason=refusal.reason) for refusal in refused]
    pending = []
    for item in items:
        skipped = guarded(item, lambda: _existing(item, options))
        if skipped is None:
            pending.append(item)
        else:
            records.append(skipped)
    return records, pending


def _existing(item: Item, options: Options) -> Record | None:
    """The file's "skipped" record when its output is already there and may stay."""
    if options.overwrite or not item.output.exists():
        return None
    return Record(path=str(item.source), output=str(item.output), status="skipped",
                  reason="its output exists (--overwrite redoes it)")


def _not_an_image(item: Item) -> Record:
    return Record(path=str(item.source), output=None, status="skipped", reason="not an image")


def make_report(records: Sequence[Record], seconds: float, stopped: bool) -> Report:
    """The records by path, and their summary."""
    counts = {status: sum(record.status == status for record in records)
              for status in ("upscaled", "skipped", "failed", "interrupted")}
    summary = Summary(files=len(records), seconds=round(seconds, 3), stopped=stopped,
                      images_per_second=round(counts["upscaled"] / seconds, 3) if seconds > 0 else 0.0, **counts)
    return Report(summary=summary, files=sorted(records, key=lambda record: record.path))


def unfinished(item: Item, stopped: bool, why: str | None = None) -> Record:
    """The record of a file the batch ended without one for: stopped before it was done, or else lost to a fault
    (`why`, or one the log tells)."""
    if stopped:
        return interrupted(item, started=False)
    return failed(item, why or "an internal error stopped this file; see the log", 0.0)


def failed(item: Item, reason: str, seconds: float) -> Record:
    return Record(path=str(item.source), output=str(item.output), status="failed", reason=reason,
                  seconds=round(seconds, 3))


def interrupted(item: Item, seconds: float = 0.0, started: bool = True) -> Record:
    reason = ("the batch was stopped; this file's work was discarded" if started
              else "the batch was stopped before this file started")
    return Record(path=str(item.source), output=str(item.output), status="interrupted", reason=reason,
                  seconds=round(seconds, 3))


class Batch:
    ON_STOP = "no new files; finishing the ones on the device (again to discard them)"

    def __init__(self, engine: LocalEngine, settings: Settings, options: Options, items: list[Item],
                 refused: Sequence[Refused] = (), on_record: Callable[[Record], None] | None = None) -> None:
        self.engine = engine
        self.items = items
        self.refused = list(refused)
        self.on_record = on_record
        self.records: list[Record] = []
        self._work = FileWork(engine, settings, options)
        self._stopping = threading.Event()
        self._records: queue.Queue[Record] = queue.Queue()
        self._lock = threading.Lock()
        self._readers_left = 0

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def stop(self, discard_running: bool = False) -> None:
        """Start no new file; with `discard_running`, cancel the ones being upscaled too."""
        self._stopping.set()
        if discard_running:
            self._work.cancel.set()

    def run(self) -> Report:
        """Every file, through the pipeline; returns when all are done or the batch was stopped."""
        started = time.monotonic()
        settled, pending = set_aside(self.items, self.refused, self._work.options)
        for record in settled:
            self._emit(record)
        devices = self.engine.devices
        width = len(devices)
        decoded: queue.Queue[Loaded | None] = queue.Queue(maxsize=width)
        upscaled: queue.Queue[Upscaled | None] = queue.Queue(maxsize=width)
        work = iter(pending)
        self._readers_left = width
        threads = [threading.Thread(target=self._read, args=(work, decoded, width), name="loupe-batch-read")
                   for _ in range(width)]
        threads += [threading.Thread(target=self._upscale, args=(device, decoded, upscaled),
                                     name=f"loupe-batch-{device}") for device in devices]
        threads += [threading.Thread(target=self._write, args=(upscaled,), name="loupe-batch-write")
                    for _ in range(width)]
        for thread in threads:
            thread.start()
        try:
            while any(thread.is_alive() for thread in threads) or not self._records.empty():
                try:
                    self._deliver(self._records.get(timeout=0.1))
                except queue.Empty:
                    continue
        finally:  # whatever stops the delivery (a failing progress bar), the threads stop before it returns
            if any(thread.is_alive() for thread in threads):
                self.stop(discard_running=True)
            for thread in threads:
                thread.join()
        done = {record.path for record in self.records}
        for item in (item for item in pending if shown(str(item.source)) not in done):
            # Without a stop, only a fault in a stage itself (logged) leaves a file without its record.
            self._deliver(unfinished(item, self.stopped))
        return make_report(self.records, time.monotonic() - started, self.stopped)

    # The stages, each on its own threads.

    def _read(self, work: Iterator[Item], decoded: queue.Queue[Loaded | None], runners: int) -> None:
        try:
            while not self._stopping.is_set():
                with self._lock:
                    item = next(work, None)
                if item is None:
                    break
                loaded = guarded(item, lambda: self._work.load(item))
                if isinstance(loaded, Record):
                    self._emit(loaded)
                else:
                    decoded.put(loaded)
        finally:  # the last reader out ends the runners' input, even if a reader died
            with self._lock:
                self._readers_left -= 1
                last = self._readers_left == 0
            if last:
                for _ in range(runners):
                    decoded.put(None)

    def _upscale(self, device: torch.device, decoded: queue.Queue[Loaded | None],
                 upscaled: queue.Queue[Upscaled | None]) -> None:
        try:
            while (loaded := decoded.get()) is not None:
                if self._stopping.is_set():
                    self._emit(interrupted(loaded.item, loaded.seconds))
                    continue
                result = guarded(loaded.item, lambda: self._work.run(loaded, device), loaded.seconds)
                if isinstance(result, Record):
                    self._emit(result)
                else:
                    upscaled.put(result)
        finally:
            upscaled.put(None)

    def _write(self, upscaled: queue.Queue[Upscaled | None]) -> None:
        while (result := upscaled.get()) is not None:
            self._emit(guarded(result.loaded.item, lambda: self._work.save(result), result.seconds))

    def _emit(self, record: Record) -> None:
        self._records.put(record)

    def _deliver(self, record: Record) -> None:
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)


def write_report(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, report.model_dump_json(indent=2).encode())
