"""Custom models: any file spandrel can load, dropped into `<weights dir>/custom/`, served as the model `NAME`.

`custom/NAME.{safetensors,pth,pt,ckpt}` is the model id `NAME`; its weight id is `custom/NAME`. The folder is
read again on every listing, and each file is inspected once per version (inode, size, times): loaded on the CPU,
a pickle only through torch's `weights_only` unpickler (a file that asks to run code is refused, and nothing in it
runs), checked to be an image-to-image upscaler or restorer of 1 or 3 channels, and run once on a small probe.
Whatever fails (a half-copied file, an unknown architecture, an inpainting model, two files of one name, an id
that clashes with the catalog) is listed as not runnable, with the reason.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import spandrel
import torch

from server.catalog import NAMES, LocalSpec, ModelEntry
from server.engine.profiles import Traits, probe_side
from server.engine.weights import MANIFEST, WeightFile, WeightsError, WeightStatus, copied, downloaded, load_descriptor

FOLDER = "custom"
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
PREFIX = FOLDER + "/"  # of a custom file's weight id
RUNNABLE_PURPOSES = ("SR", "Restoration")
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


_inspected: dict[Path, CustomModel] = {}
_lock = threading.Lock()  # one inspection at a time: two requests never load the same big file twice


def version_of(path: Path) -> Version | None:
    try:
        info = path.stat()
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_dev


def scan(weights_dir: Path, reserved: AbstractSet[str]) -> list[CustomModel]:
    """Every custom model file there now, in name order; `reserved`: the catalog's ids and aliases."""
    files = _files(weights_dir)
    with _lock:  # forget the files that are gone
        for path in [p for p in _inspected if p.parent == weights_dir / FOLDER and p not in
                     {f for group in files.values() for f in group}]:
            del _inspected[path]
    models: list[CustomModel] = []
    for name, paths in sorted(files.items()):
        if name in reserved:
            models += [CustomModel(name, p, f"the id {name} is taken by a built-in model: rename the file")
                       for p in paths]
        else:
            found = _resolve(name, paths)
            if found is not None:
                models.append(found)
    return models


def find(weights_dir: Path, name: str, *, inspect_now: bool = True) -> CustomModel | None:
    """The custom model `name`, runnable or not; None when no file is it.

    `inspect_now=False` (the event loop's callers) never loads a file: a version not inspected yet is answered
    as such, and inspected by the next listing or request, which look models up in a thread.
    """
    return _resolve(name, _files(weights_dir, name).get(name, []), inspect_now)


def _files(weights_dir: Path, only: str | None = None) -> dict[str, list[Path]]:
    """The folder's model files by model id (a file name's stem), or only those of `only`."""
    try:
        entries = list((weights_dir / FOLDER).iterdir())
    except OSError:
        return {}
    named: dict[str, list[Path]] = {}
    for path in sorted(entries):
        if path.suffix.lower() in SUFFIXES and not path.name.startswith(".") and only in (None, path.stem):
            named.setdefault(path.stem, []).append(path)
    return named


def _resolve(name: str, paths: list[Path], inspect_now: bool = True) -> CustomModel | None:
    """The one model these files (all named `name`) make: the same answer for the listing and for a request."""
    if not paths:
        return None
    if not _NAME.fullmatch(name):
        return CustomModel(name, paths[0], "a model id takes letters, digits and . _ + - only: rename the file")
    if len(paths) > 1:
        return CustomModel(name, paths[0], f"{len(paths)} files are the model {name}: keep one")
    return inspected(paths[0], name, inspect_now)


def inspected(path: Path, name: str, inspect_now: bool = True) -> CustomModel | None:
    """The file's inspection, made once per version of it; None if the file is gone.

    A known version is answered without the lock, so that the event loop never waits on another inspection.
    """
    version = version_of(path)
    if version is None:
        return None
    cached = _inspected.get(path)
    if cached is not None and cached.version == version and cached.id == name:
        return cached
    if not inspect_now:
        return CustomModel(name, path, f"{path.name} changed and hasn't been read again yet: retry in a moment")
    with _lock:
        cached = _inspected.get(path)
        if cached is None or cached.version != version or cached.id != name:
            cached = _inspected[path] = dataclasses.replace(inspect(path, name), version=version)
        return cached


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


def add(source: str, weights_dir: Path, name: str | None = None) -> CustomModel:
    """Copy (a path) or download (an http(s) URL) a model file into the custom folder, kept only if it loads and
    runs; WeightsError, and nothing left in the folder, otherwise."""
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
    with (downloaded(source, target, None) if is_url else copied(Path(source), target)) as (part, _):
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
    """The manifest's weight, or a runnable custom file's; None for neither."""
    if weight_id in MANIFEST:
        return MANIFEST[weight_id]
    if not weight_id.startswith(PREFIX):
        return None
    model = find(weights_dir, weight_id.removeprefix(PREFIX))
    return model.weight if model is not None and model.reason is None else None
