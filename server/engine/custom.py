"""Custom models: any file spandrel can load, dropped into `<weights dir>/custom/`, served as the model `NAME`.

`custom/NAME.{safetensors,pth,pt,ckpt}` is the model id `NAME`; its weight id is `custom/NAME`. The folder is
read again on every listing, and each file is inspected once per version (size and modification time): loaded
on the CPU by spandrel (pickles only through its restricted unpickler: a file that asks to run code is refused,
never run), checked to be an image-to-image upscaler or restorer of 1 or 3 channels, and run once on a small
probe. Whatever fails (a half-copied file, an unknown architecture, an inpainting model, an id that clashes with
the catalog) is listed as not runnable, with the reason.
"""
from __future__ import annotations

import dataclasses
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import spandrel
import torch

from server.catalog import MODELS, LocalSpec, ModelEntry
from server.engine.profiles import probe_side
from server.engine.weights import MANIFEST, WeightFile, WeightsError, WeightStatus, copied, downloaded

FOLDER = "custom"
SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
PREFIX = FOLDER + "/"  # of a custom file's weight id
RUNNABLE_PURPOSES = ("SR", "Restoration")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


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


_inspected: dict[Path, tuple[tuple[int, int], CustomModel]] = {}
_lock = threading.Lock()


def scan(weights_dir: Path, reserved: set[str]) -> list[CustomModel]:
    """Every custom model file there now, in name order; `reserved`: the catalog's ids and aliases."""
    folder = weights_dir / FOLDER
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES and not p.name.startswith("."))
    except OSError:
        return []
    models: list[CustomModel] = []
    seen: set[str] = set()
    for path in files:
        name = path.stem
        if name in reserved:
            models.append(CustomModel(name, path, f"the id {name} is taken by a built-in model: rename the file"))
        elif name in seen:
            models.append(CustomModel(name, path, f"another file is already the model {name}: rename one"))
        elif not _NAME.fullmatch(name):
            models.append(CustomModel(name, path, "a model id takes letters, digits and . _ + - only: rename it"))
        else:
            found = inspected(path, name)
            if found is not None:
                models.append(found)
        seen.add(name)
    return models


def inspected(path: Path, name: str) -> CustomModel | None:
    """The file's inspection, made once per version of it; None if the file is gone."""
    try:
        info = path.stat()
    except OSError:
        return None
    version = (info.st_size, info.st_mtime_ns)
    with _lock:
        cached = _inspected.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
    model = inspect(path, name)
    with _lock:
        _inspected[path] = (version, model)
    return model


def inspect(path: Path, name: str) -> CustomModel:
    """Load `path` with spandrel on the CPU and run it once on a probe: a runnable model, or why not."""
    try:
        descriptor = spandrel.ModelLoader(device="cpu").load_from_file(path)
    except Exception as error:  # truncated, foreign, unsafe pickle, unknown architecture: each is one answer
        return CustomModel(name, path, f"spandrel can't load {path.name}: {_first_line(error)}")
    architecture = descriptor.architecture.id
    facts = {"architecture": architecture, "purpose": descriptor.purpose,
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
    if name in {n for entry in MODELS for n in (entry.id, *entry.aliases)}:
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


def find(weights_dir: Path, name: str) -> CustomModel | None:
    """The custom model `name`, runnable or not; None when no file is it."""
    if not _NAME.fullmatch(name):
        return None
    files = [weights_dir / FOLDER / (name + suffix) for suffix in SUFFIXES]
    found = [model for path in files if path.is_file() for model in [inspected(path, name)] if model is not None]
    if len(found) > 1:
        return CustomModel(name, found[0].path, f"more than one file is the model {name}: keep one")
    return found[0] if found else None

