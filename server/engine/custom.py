"""Custom models: any file spandrel can load, dropped into `<weights dir>/custom/`, served as the model `NAME`.

`custom/NAME.{safetensors,pth,pt,ckpt}` is the model id `NAME`; its weight id is `custom/NAME`. The folder is
read again on every listing (names and `stat` only: nothing is opened there). Each file is inspected once per
version (inode, size, times), on one thread of its own, never under a lock a listing or a request waits on:
only a regular file is opened (non-blocking, checked again once open, so a FIFO or a device can't hang it),
an archive whose records declare far more than the file holds (a zip bomb) is refused before it is read, a
pickle goes only through torch's `weights_only` unpickler (a file that asks to run code is refused, and
nothing in it runs), and the model must be an image-to-image upscaler or restorer of 1 or 3 channels that
runs on a small probe. Callers wait for an inspection only as long as they choose; until it ends the file
is listed as being read. Whatever fails (a half-copied file, an unknown architecture, an inpainting model,
two files of one name, an id that clashes with the catalog) is listed as not runnable, with the reason,
which names the file but never the server's folders. A file name that isn't valid UTF-8 is skipped, with a
warning in the log.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import re
import stat
import threading
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import spandrel
import torch

from server.catalog import NAMES, LocalSpec, ModelEntry
from server.engine.profiles import Traits, probe_side
from server.engine.weights import MANIFEST, WeightFile, WeightsError, WeightStatus, copied, downloaded, load_descriptor

log = logging.getLogger("loupe.custom")

FOLDER = "custom"
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
PREFIX = FOLDER + "/"  # of a custom file's weight id
RUNNABLE_PURPOSES = ("SR", "Restoration")
BEING_READ = "being read (a new or changed file): retry in a moment"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")
Version = tuple[int, int, int, int, int]  # inode, size, mtime, ctime, device


@dataclass(frozen=True)
class CustomModel:
    id: str
    path: Path
    reason: str | None  # why it can't run; None: it can
    architecture: str | None = None
    scale: int = 1
    channels: int = 3  # in and out: 3, or 1 (luminance)
    params: int = 0
    purpose: str | None = None
    traits: Traits | None = None  # what spandrel's descriptor says of it
    version: Version | None = None  # of the file inspected
    pending: bool = False  # its inspection is under way

    @property
    def weight_id(self) -> str:
        return PREFIX + self.id

    @property
    def entry(self) -> ModelEntry:
        what = f"{self.architecture} x{self.scale}" if self.architecture else "not loadable"
        return ModelEntry(id=self.id, description=f"custom model {self.path.name} ({what})",
                          default_scale=self.scale, local=LocalSpec(weights={self.scale: self.weight_id}),
                          gateway=False, owned_by="custom")

    @property
    def weight(self) -> WeightFile:
        return WeightFile(id=self.weight_id, architecture=self.architecture or "?", scale=self.scale,
                          network_scale=self.scale, license="its author's (see where it came from)",
                          filename=self.path.name, url=None, sha256=None, directory=FOLDER)


class _Inspections:
    """Each file version's inspection, run once on a thread of its own and kept."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="loupe-inspect")
        self._lock = threading.Lock()  # held only to read or change the two tables, never while inspecting
        self._done: dict[Path, CustomModel] = {}
        self._running: dict[Path, tuple[Version, str, Future[CustomModel]]] = {}

    def get(self, path: Path, name: str, version: Version) -> CustomModel | Future[CustomModel]:
        """The inspection of this version of the file, or the future of one under way (started if need be)."""
        with self._lock:
            done = self._done.get(path)
            if done is not None and (done.version, done.id) == (version, name):
                return done
            running = self._running.get(path)
            if running is not None and running[:2] == (version, name):
                return running[2]
            future = self._thread.submit(self._inspect, path, name, version)
            self._running[path] = (version, name, future)
            return future

    def _inspect(self, path: Path, name: str, version: Version) -> CustomModel:
        model = dataclasses.replace(inspect(path, name), version=version)
        with self._lock:
            self._done[path] = model
            if self._running.get(path, (None, None))[:2] == (version, name):
                del self._running[path]
        return model

    def forget_all_but(self, folder: Path, present: AbstractSet[Path]) -> None:
        with self._lock:
            for path in [p for p in self._done if p.parent == folder and p not in present]:
                del self._done[path]


_inspections = _Inspections()
_warned: set[str] = set()  # undecodable names already warned of: a warning each, not one per listing


def version_of(path: Path) -> Version | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_dev


def scan(weights_dir: Path, reserved: AbstractSet[str]) -> list[CustomModel]:
    """Every custom model file there now, in name order, once the inspections under way have ended; `reserved`:
    the catalog's ids and aliases."""
    models, pending = _listing(weights_dir, reserved)
    if pending:
        concurrent.futures.wait(pending)
        models, _ = _listing(weights_dir, reserved)
    return models


async def scan_async(weights_dir: Path, reserved: AbstractSet[str], wait_s: float) -> list[CustomModel]:
    """`scan` for the event loop: no thread is held while an inspection runs."""
    models, pending = await asyncio.to_thread(_listing, weights_dir, reserved)
    if pending and wait_s > 0:
        await asyncio.wait([asyncio.wrap_future(future) for future in pending], timeout=wait_s)
        models, _ = await asyncio.to_thread(_listing, weights_dir, reserved)
    return models


def find(weights_dir: Path, name: str, wait_s: float | None = None) -> CustomModel | None:
    """The custom model `name`, runnable or not; None when no file is it. Waits up to `wait_s` for its inspection
    (None: until it ends; 0: never, for the event loop's callers)."""
    found, pending = _found(weights_dir, name)
    if pending is not None and wait_s != 0:
        concurrent.futures.wait([pending], timeout=wait_s)
        found, _ = _found(weights_dir, name)
    return found


async def find_async(weights_dir: Path, name: str, wait_s: float) -> CustomModel | None:
    """`find` for the event loop: no thread is held while the inspection runs."""
    found, pending = await asyncio.to_thread(_found, weights_dir, name)
    if pending is not None and wait_s > 0:
        await asyncio.wait([asyncio.wrap_future(pending)], timeout=wait_s)
        found, _ = await asyncio.to_thread(_found, weights_dir, name)
    return found


def _listing(weights_dir: Path, reserved: AbstractSet[str]) -> tuple[list[CustomModel], list[Future[CustomModel]]]:
    files = _files(weights_dir)
    _inspections.forget_all_but(weights_dir / FOLDER, {path for paths in files.values() for path in paths})
    models: list[CustomModel] = []
    pending: list[Future[CustomModel]] = []
    for name, paths in sorted(files.items()):
        if name in reserved:
            models += [CustomModel(name, p, f"the id {name} is taken by a built-in model: rename the file")
                       for p in paths]
            continue
        found = _resolve(name, paths)
        if isinstance(found, Future):
            pending.append(found)
            found = CustomModel(name, paths[0], f"{paths[0].name} is {BEING_READ}", pending=True)
        if found is not None:
            models.append(found)
    return models, pending


def _found(weights_dir: Path, name: str) -> tuple[CustomModel | None, Future[CustomModel] | None]:
    paths = _files(weights_dir, name).get(name, [])
    found = _resolve(name, paths)
    if isinstance(found, Future):
        return CustomModel(name, paths[0], f"{paths[0].name} is {BEING_READ}", pending=True), found
    return found, None


def _files(weights_dir: Path, only: str | None = None) -> dict[str, list[Path]]:
    """The folder's model files by model id (a file name's stem), or only those of `only`."""
    try:
        entries = list((weights_dir / FOLDER).iterdir())
    except OSError:
        return {}
    named: dict[str, list[Path]] = {}
    for path in sorted(entries):
        if path.suffix.lower() not in SUFFIXES or path.name.startswith(".") or only not in (None, path.stem):
            continue
        if not _decodes(path.name):
            continue
        named.setdefault(path.stem, []).append(path)
    return named


def _decodes(name: str) -> bool:
    """Whether a file name is valid UTF-8 (Python keeps other bytes as surrogates): no model id can hold it."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if shown not in _warned:
            _warned.add(shown)
            log.warning("skipping a custom model file whose name is not valid UTF-8: rename it",
                        extra={"file": shown})
        return False
    return True


def _resolve(name: str, paths: list[Path]) -> CustomModel | Future[CustomModel] | None:
    """The one model these files (all named `name`) make, or the inspection under way that will say: the same
    answer for the listing and for a request."""
    if not paths:
        return None
    if not _NAME.fullmatch(name):
        return CustomModel(name, paths[0], "a model id takes letters, digits and . _ + - only: rename the file")
    if len(paths) > 1:
        return CustomModel(name, paths[0], f"{len(paths)} files are the model {name}: keep one")
    path = paths[0]
    try:
        info = path.stat()
    except OSError:
        return None  # gone since the folder was read
    if not stat.S_ISREG(info.st_mode):
        return CustomModel(name, path, f"{path.name} is not a regular file (a folder, a FIFO or a device): Loupe "
                                       "reads model files only")
    version = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_dev)
    return _inspections.get(path, name, version)


def inspect(path: Path, name: str) -> CustomModel:
    """Load `path` on the CPU and run it once on a probe: a runnable model, or why not."""
    try:
        descriptor = load_descriptor(path)
    except Exception as error:  # truncated, foreign, unsafe pickle, unknown architecture: each is one answer
        return CustomModel(name, path, f"spandrel can't load {path.name}: {_first_line(error)}")
    architecture = descriptor.architecture.id
    facts = {"architecture": architecture, "purpose": descriptor.purpose, "traits": Traits.of(descriptor),
             "params": sum(p.numel() for p in descriptor.model.parameters())}
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.purpose not in RUNNABLE_PURPOSES:
        return CustomModel(name, path, f"it is a {architecture} {descriptor.purpose} model (inpainting, face "
                                       "restoration and the like need more than an image): not an upscaler", **facts)
    channels = (descriptor.input_channels, descriptor.output_channels)
    if channels not in ((3, 3), (1, 1)):
        return CustomModel(name, path, f"it maps {channels[0]} channels to {channels[1]}; Loupe runs RGB or "
                                       "1-channel (luminance) models", **facts)
    problem = _probe(descriptor)
    if problem is not None:
        return CustomModel(name, path, f"it fails on a probe input: {problem}", **facts)
    return CustomModel(name, path, None, scale=descriptor.scale, channels=channels[0], **facts)


def _probe(descriptor: spandrel.ImageModelDescriptor) -> str | None:
    side = probe_side(descriptor)
    sample = torch.rand(1, descriptor.input_channels, side, side)
    expected = (1, descriptor.output_channels, side * descriptor.scale, side * descriptor.scale)
    try:
        with torch.inference_mode():
            output = descriptor.model.eval()(sample)
    except Exception as error:  # a network that can't run is listed, never served
        return _first_line(error)
    if tuple(output.shape) != expected:
        return f"it made {tuple(output.shape)} from {tuple(sample.shape)}, not {expected}"
    if not torch.isfinite(output).all():
        return "its output is not finite"
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


def add(source: str, weights_dir: Path, name: str | None = None, *, max_bytes: int,
        allow_private: bool = False) -> CustomModel:
    """Copy (a path) or download (an http(s) URL, under the outbound policy and `max_bytes`) a model file into the
    custom folder, kept only if it loads and runs; WeightsError, and nothing left in the folder, otherwise."""
    is_url = source.lower().startswith(("http://", "https://"))
    file_name = Path(urlsplit(source).path if is_url else source).name
    suffix = Path(file_name).suffix.lower()
    if suffix not in SUFFIXES:
        raise WeightsError(f"{file_name or source}: a model file ends in {', '.join(SUFFIXES)}")
    name = name or Path(file_name).stem
    if not _NAME.fullmatch(name):
        raise WeightsError(f"{name!r}: a model id takes letters, digits and . _ + - only; pick one with --name")
    if name in NAMES:
        raise WeightsError(f"the id {name} is taken by a built-in model; pick another with --name")
    folder = weights_dir / FOLDER
    if any((folder / (name + s)).exists() for s in SUFFIXES):
        raise WeightsError(f"a custom model {name} is already in {folder}; remove it first, or pick another --name")
    target = folder / (name + suffix)
    fetched = (downloaded(source, target, None, max_bytes=max_bytes, allow_private=allow_private) if is_url
               else copied(Path(source), target))
    with fetched as (part, _):
        model = inspect(part, name)
        if model.reason is not None:
            raise WeightsError(f"{file_name} was not added: {model.reason}")
        part.replace(target)
    return dataclasses.replace(model, path=target)


def status(model: CustomModel) -> WeightStatus:
    """A custom file as `loupe weights list` shows it."""
    size = model.path.stat().st_size if model.path.exists() else None
    what = f"{model.architecture} x{model.scale}, {model.params / 1e6:.2f} M parameters" if model.architecture else ""
    return WeightStatus(model.weight_id, model.reason is None, model.path, size, "local file", (),
                        note=model.reason or f"custom: {what}")


def weight_file(weight_id: str, weights_dir: Path) -> WeightFile | None:
    """The manifest's weight, or a runnable custom file's; None for neither. Waits for a custom file's
    inspection: not for the event loop."""
    if weight_id in MANIFEST:
        return MANIFEST[weight_id]
    if not weight_id.startswith(PREFIX):
        return None
    model = find(weights_dir, weight_id.removeprefix(PREFIX))
    return model.weight if model is not None and model.reason is None else None
