"""`loupe upscale --ray`: a folder batch on Ray Data.

    read_binary_files (the files as bytes) ─► map_batches(_Upscaler actors, one engine per device) ─► records

Each actor holds one LocalEngine and gives each file the local batch's own steps (`FileWork.whole`: Loupe's
decoder, so EXIF, ICC, 16-bit and alpha survive; the job, the run, the encode and the atomic write). Only
the file's record comes back. The driver skips existing outputs before anything is read, and the report,
the summary and the exit status are the local batch's.

A stop (Ctrl-C, SIGTERM) ends the run at once: the files in flight are discarded (outputs are written by
rename, never half) and reported as interrupted, and a later run resumes with them. A file whose output was
written just before the stop, though its record had not come back, is reported as upscaled.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray

from server.batch import FileWork, Options, Record, Report, make_report, set_aside, unfinished
from server.cluster.layout import plan_layout, use_actor_cpus
from server.cluster.runtime import connected
from server.config import Settings
from server.engine.runtime import LocalEngine
from server.folders import Item, Refused, shown
from server.logs import configure_logging_for

_END = object()
_RETRIES = 1
log = logging.getLogger("loupe.batch")


class _Upscaler:
    """A Ray Data actor: one engine on the device Ray gave it; torch's threads are its CPUs."""

    def __init__(self, options: Options, items: dict[str, Item]) -> None:
        use_actor_cpus()
        settings = Settings()
        configure_logging_for(settings)
        self.engine = LocalEngine(settings)
        self.work = FileWork(self.engine, settings, options)
        self.items = items

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, list[str]]:
        device = self.engine.devices[0]
        records = [self.work.whole(self.items[_key(str(path))], bytes(data), device)
                   for path, data in zip(rows["path"], rows["bytes"])]
        return {"record": [record.model_dump_json() for record in records]}


def _written_meanwhile(item: Item, since: float) -> Record | None:
    """The record of a file whose output this run wrote (whole: by rename) before a stop cut its record short."""
    try:
        written = item.output.stat().st_mtime >= since
    except FileNotFoundError:
        return None
    return Record(path=str(item.source), output=str(item.output), status="upscaled",
                  reason="written just before the stop, which cut its record short") if written else None


def _key(path: str) -> str:
    """A file as the driver names it and as Ray Data's `path` column does (without the leading slash)."""
    return path.lstrip("/")


class RayBatch:
    """The batch's files through Ray Data: `run` and `stop` as `Batch`'s."""

    ON_STOP = "the files in flight are discarded (run it again to resume)"

    def __init__(self, settings: Settings, address: str | None, options: Options, items: list[Item],
                 refused: Sequence[Refused] = (), on_record: Callable[[Record], None] | None = None) -> None:
        self.settings = settings
        self.address = address  # the cluster's; None: a Ray of this machine, started only if a file needs work
        self.options = options
        self.items = items
        self.refused = list(refused)
        self.on_record = on_record
        self.records: list[Record] = []
        self._stopping = threading.Event()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def stop(self, discard_running: bool = False) -> None:
        self._stopping.set()

    def run(self) -> Report:
        started, since = time.monotonic(), time.time()
        settled, pending = set_aside(self.items, self.refused, self.options)
        for record in settled:
            self._deliver(record)
        failure = None
        if pending:
            with connected(self.settings, self.address):
                failure = self._run_on_ray(pending)
        done = {record.path for record in self.records}
        for item in pending:  # Ray's actors are gone now, and have written what they wrote
            if shown(str(item.source)) not in done:
                self._deliver(_written_meanwhile(item, since) or unfinished(item, self.stopped, failure))
        return make_report(self.records, time.monotonic() - started, self.stopped)

    def _run_on_ray(self, pending: list[Item]) -> str | None:
        """Delivers the records of `pending` as they come back; returns why Ray Data gave up, if it did."""
        context = ray.data.DataContext.get_current()  # Loupe's own bar shows the progress, per file
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        paths = [str(item.source.resolve()) for item in pending]
        layout = plan_layout("auto", ray.nodes(), self.settings)
        dataset = ray.data.read_binary_files(
            paths, include_paths=True,
            override_num_blocks=len(pending),  # a file per block: each goes to the first free engine
            num_cpus=0)  # reading is I/O: the CPUs are the engines'
        upscaled = dataset.map_batches(
            _Upscaler, batch_size=1, fn_constructor_kwargs={
                "options": self.options, "items": {_key(path): item for path, item in zip(paths, pending)}},
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(layout.max_replicas, len(pending))),
            # An engine that dies (say, of memory) is restarted and its file tried again, once: never for ever.
            max_restarts=_RETRIES, max_task_retries=_RETRIES, **layout.resources)
        records: queue.Queue[Any] = queue.Queue()

        def consume() -> None:
            try:
                for row in upscaled.iter_rows():
                    records.put(Record.model_validate_json(row["record"]))
                    if self._stopping.is_set():
                        return
            except BaseException as error:  # handed to the driver's thread
                records.put(error)
            finally:
                records.put(_END)

        threading.Thread(target=consume, name="loupe-ray-batch", daemon=True).start()
        while True:
            try:
                got = records.get(timeout=0.1)
            except queue.Empty:
                if self._stopping.is_set():  # what has come back is delivered; the rest is not waited for
                    return None
                continue
            if got is _END:
                return None
            if isinstance(got, BaseException):
                log.error("the Ray Data batch failed", exc_info=got)
                return f"the Ray Data batch failed before this file was done: {type(got).__name__}: {got}"
            self._deliver(got)

    def _deliver(self, record: Record) -> None:
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)
