"""A batch's inputs: files, folders and globs to (source, output) pairs, the output tree mirroring the input's.

Each output keeps its file's name and format, or takes `--format`'s; a format Loupe can't write (TIFF,
BMP) or shouldn't (GIF: re-quantizing an upscale to 256 colours would undo it) becomes PNG, as over
HTTP. Which files are images is decided later, by their content (`is_image_like`), never by their name.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from server import imaging
from server.jobs import EXTENSIONS, OutputFormat

# Pillow's format for each file extension it knows ("jpe" → JPEG), limited to the formats Loupe reads.
_FORMAT_OF_SUFFIX = {suffix: fmt for suffix, fmt in Image.registered_extensions().items()
                     if fmt in imaging.INPUT_FORMATS}
_OUTPUT_FORMAT_OF_SUFFIX: dict[str, OutputFormat] = {".jpeg": "jpeg", ".jpg": "jpeg", ".png": "png",
                                                     ".webp": "webp", ".gif": "gif", ".avif": "avif"}


class UsageError(ValueError):
    """Inputs or an output that can't make a batch: the command line is wrong (exit status 2)."""


@dataclass(frozen=True)
class Item:
    source: Path
    output: Path
    format: OutputFormat


@dataclass(frozen=True)
class Collision:
    """A file whose output name another input already takes (`photo.gif` and `photo.png` both make `photo.png`)."""

    source: Path
    output: Path
    taken_by: Path


def single_file(source: Path, output: Path, fmt: OutputFormat | None) -> Item:
    """`loupe upscale photo.jpg -o big.png`: one file to exactly that path, in the format its extension names."""
    named = _OUTPUT_FORMAT_OF_SUFFIX.get(output.suffix.lower())
    if named is None:
        raise UsageError(f"can't tell the format from {output.name!r}: end it with one of "
                         f"{', '.join(_OUTPUT_FORMAT_OF_SUFFIX)}, or give a folder to write into")
    if fmt is not None and fmt != named:
        raise UsageError(f"--format {fmt} and the output {output.name!r} disagree; give one of them")
    return Item(source, output, named)


def collect(inputs: list[str], out: Path, fmt: OutputFormat | None) -> tuple[list[Item], list[Collision]]:
    """Every file the inputs name, in a stable order, each with its output under `out`.

    A folder's files are found recursively and keep their paths relative to it; a glob's keep theirs
    relative to the folder its pattern starts in; a file named on its own goes straight into `out`.
    Nothing under `out` itself is an input, so `loupe upscale photos -o photos/big` can run twice.
    """
    out_resolved = out.resolve()
    items: list[Item] = []
    collisions: list[Collision] = []
    owners: dict[Path, Path] = {}
    seen: set[Path] = set()
    for source, relative in _sources(inputs, out_resolved):
        resolved = source.resolve()
        if resolved in seen:  # named twice (a folder and a glob inside it)
            continue
        seen.add(resolved)
        output, output_format = _output_of(out / relative, fmt)
        key = output.resolve()
        if key in owners:
            collisions.append(Collision(source, output, owners[key]))
            continue
        owners[key] = source
        items.append(Item(source, output, output_format))
    return items, collisions


def _sources(inputs: list[str], out: Path) -> list[tuple[Path, Path]]:
    """(file, its path relative to where its input starts) for every input."""
    found: list[tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found += [(file, file.relative_to(path)) for file in _walk(path, out)]
        elif path.is_file():
            found.append((path, Path(path.name)))
        elif glob.has_magic(text):
            base = _fixed_prefix(text)
            matches = sorted(Path(match) for match in glob.glob(text, recursive=True))
            files = [match for match in matches if match.is_file() and not _is_under(match.resolve(), out)]
            for directory in (match for match in matches if match.is_dir()):
                files += _walk(directory, out)
            if not files:
                raise UsageError(f"no file matches {text!r}")
            found += [(file, file.relative_to(base)) for file in files]
        else:
            raise UsageError(f"no such file or folder: {text}")
    return found


def _walk(folder: Path, out: Path) -> list[Path]:
    """The files under `folder`, sorted by path, following no folder links (a link loop can't trap the scan)."""
    files: list[Path] = []
    for root, folders, names in os.walk(folder):
        here = Path(root)
        folders[:] = sorted(name for name in folders if not _is_under((here / name).resolve(), out))
        files += [here / name for name in names if (here / name).is_file()]
    return sorted(files)


def _fixed_prefix(pattern: str) -> Path:
    """The folder a glob starts in: its path up to the first part with a wildcard."""
    parts = Path(pattern).parts
    fixed = [part for part in parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]]
    return Path(*fixed) if fixed else Path(".")


def _is_under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _output_of(mirrored: Path, fmt: OutputFormat | None) -> tuple[Path, OutputFormat]:
    """The output path and format of an input mirrored into the output tree.

    A name whose extension already says the output format is kept as it is (`IMG.JPEG`); an image extension
    of another format is replaced (`scan.tif` → `scan.png`); an unknown one is kept and the format's added
    (`frame.0001` → `frame.0001.png`), so that no two inputs of one folder lose their difference.
    """
    suffix = mirrored.suffix.lower()
    input_format = _FORMAT_OF_SUFFIX.get(suffix)
    output_format = fmt or (imaging.default_output_format(input_format) if input_format else "png")
    if _OUTPUT_FORMAT_OF_SUFFIX.get(suffix) == output_format:
        return mirrored, output_format
    extension = "." + EXTENSIONS[output_format]
    if input_format is not None:
        return mirrored.with_suffix(extension), output_format
    return mirrored.with_name(mirrored.name + extension), output_format


# Magic numbers of image files, the ones Loupe reads and common ones it doesn't: a file with one of these is
# an image (corrupt or unsupported, it fails and is reported); any other file is not one, and is skipped.
_SIGNATURES = (
    b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM",
    b"8BPS",  # Photoshop
    b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n",  # JPEG XL
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000
    b"qoif", b"v/1\x01",  # QOI, OpenEXR
)
_ISO_MEDIA_BRANDS = {b"avif", b"avis", b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1"}  # AVIF, HEIF


def is_image_like(head: bytes) -> bool:
    """Whether a file's first bytes are those of an image format (readable by Loupe or not)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:8] == b"ftyp" and head[8:12] in _ISO_MEDIA_BRANDS:
        return True
    return head.startswith(_SIGNATURES)
