"""A batch's files: inputs (files, folders and globs) to (source, output) pairs, the output tree mirroring the
input's; the report's path; paths as a terminal shows them.

Each output keeps its file's name and format, or takes `--format`'s; a format Loupe can't write (TIFF,
BMP) or shouldn't (GIF: re-quantizing an upscale to 256 colours would undo it) becomes PNG, as over
HTTP. Which files are images is decided later, by their content (`is_image_like`), never by their name.
"""
from __future__ import annotations

import glob
import os
import tempfile
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


def shown(text: str | Path) -> str:
    """A path (or a text that holds one) as the report and the terminal show it: a file name that is not valid
    UTF-8 keeps its other bytes as `\\xNN` escapes instead of breaking the JSON or the line."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, Path) else \
        text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_report_path(path: Path) -> None:
    """UsageError, before any work, when a report could not be written at `path`."""
    if path.is_dir():
        raise UsageError(f"--report {shown(path)} is a folder: name a file, such as report.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".loupe-report-"):
            pass
    except OSError as error:
        raise UsageError(f"--report {shown(path)} can't be written ({error.strerror or error})") from None


class UsageError(ValueError):
    """Inputs or an output that can't make a batch: the command line is wrong (exit status 2)."""


@dataclass(frozen=True)
class Item:
    source: Path
    output: Path
    format: OutputFormat


@dataclass(frozen=True)
class Refused:
    """An input that can't be upscaled whatever its content: a folder that can't be read, or a file whose output
    another input already takes (`photo.gif` and `photo.png` both make `photo.png`)."""

    source: Path
    output: Path | None
    reason: str


def names_a_file(output: Path) -> bool:
    """Whether `-o` names an output file rather than a folder: an image extension (`big.png`, `big.tif`), and no
    folder there. `out.v2` is a folder."""
    suffix = output.suffix.lower()
    return (suffix in _OUTPUT_FORMAT_OF_SUFFIX or suffix in _FORMAT_OF_SUFFIX) and not output.is_dir()


def single_file(source: Path, output: Path, fmt: OutputFormat | None) -> Item:
    """`loupe upscale photo.jpg -o big.png`: one file to exactly that path, in the format its extension names."""
    if output.resolve() == source.resolve():
        raise UsageError(f"the output {output} is the input itself; name another file")
    named = _OUTPUT_FORMAT_OF_SUFFIX.get(output.suffix.lower())
    if named is None:
        raise UsageError(f"can't tell the format from {output.name!r}: end it with one of "
                         f"{', '.join(_OUTPUT_FORMAT_OF_SUFFIX)}, or give a folder to write into")
    if fmt is not None and fmt != named:
        raise UsageError(f"--format {fmt} and the output {output.name!r} disagree; give one of them")
    return Item(source, output, named)


def collect(inputs: list[str], out: Path, fmt: OutputFormat | None) -> tuple[list[Item], list[Refused]]:
    """Every file the inputs name, in path order, each with its output under `out`; and the inputs refused.

    A folder's files are found recursively and keep their paths relative to it; a glob's keep theirs
    relative to the folder its pattern starts in; a file named on its own goes straight into `out`.
    Nothing under `out` itself is an input, so `loupe upscale photos -o photos/big` can run twice. Where
    two inputs would make one output, the one whose own name it is wins (`photo.png` over `photo.gif`).
    """
    _check_output_folder(out)
    out_resolved = out.resolve()
    refused: list[Refused] = []
    candidates: list[tuple[Path, Path, OutputFormat]] = []
    seen: set[Path] = set()
    for source, relative in _sources(inputs, out_resolved, refused):
        resolved = source.resolve()
        if resolved in seen:  # named twice (a folder and a glob inside it)
            continue
        seen.add(resolved)
        output, output_format = _output_of(out / relative, fmt)
        if output.resolve() == resolved:
            raise UsageError(f"{source} would be overwritten by its own upscale: give an output folder apart "
                             "from the inputs")
        candidates.append((source, output, output_format))
    owners: dict[Path, Path] = {}
    for source, output, _ in sorted(candidates, key=lambda c: c[0].name != c[1].name):
        owners.setdefault(output.resolve(), source)
    items = []
    for source, output, output_format in candidates:
        owner = owners[output.resolve()]
        if owner == source:
            items.append(Item(source, output, output_format))
        else:
            refused.append(Refused(source, output, f"its output {output} is also that of {owner}: rename one of "
                                                   "them, or give --format"))
    return items, refused


def _check_output_folder(out: Path) -> None:
    """UsageError unless `out` is a folder the outputs can go into, or can become one."""
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        what = "is a file" if existing == out else f"is under {existing}, which is a file"
        raise UsageError(f"-o {out} {what}: give a folder for the outputs (a file is the output of one input "
                         "file only)")
    if not os.access(existing, os.W_OK):
        raise UsageError(f"-o {out}: {existing} can't be written")


def _sources(inputs: list[str], out: Path, refused: list[Refused]) -> list[tuple[Path, Path]]:
    """(file, its path relative to where its input starts) for every input; folders that can't be read go to
    `refused`."""
    found: list[tuple[Path, Path]] = []
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            if _is_under(path.resolve(), out):
                raise UsageError(f"the input folder {path} is the output folder or inside it; write elsewhere")
            found += [(file, file.relative_to(path)) for file in _walk(path, out, refused)]
        elif path.is_file():
            found.append((path, Path(path.name)))
        elif glob.has_magic(text):
            base = _fixed_prefix(text)
            matches = sorted(Path(os.path.normpath(match)) for match in glob.glob(text, recursive=True))
            files = [match for match in matches if match.is_file() and not _is_under(match.resolve(), out)]
            for directory in (match for match in matches if match.is_dir()):
                files += _walk(directory, out, refused)
            if not files:
                raise UsageError(f"no file matches {text!r}")
            for file in files:
                relative = Path(os.path.relpath(file, base))
                if relative.parts[:1] == ("..",):
                    raise UsageError(f"{text!r} reaches {file}, outside the folder it starts in ({base})")
                found.append((file, relative))
        else:
            raise UsageError(f"no such file or folder: {text}")
    return found


def _walk(folder: Path, out: Path, refused: list[Refused]) -> list[Path]:
    """The files under `folder`, sorted by path, following no folder links (a link loop can't trap the scan)."""
    files: list[Path] = []

    def unreadable(error: OSError) -> None:
        refused.append(Refused(Path(error.filename or folder), None, f"can't read this folder: {error.strerror}"))

    for root, folders, names in os.walk(folder, onerror=unreadable):
        here = Path(root)
        folders[:] = sorted(name for name in folders if not _is_under((here / name).resolve(), out))
        files += [here / name for name in names if (here / name).is_file()]
    return sorted(files)


def _fixed_prefix(pattern: str) -> Path:
    """The folder a glob starts in: its path up to the first part with a wildcard."""
    parts = Path(pattern).parts
    fixed = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
    return Path(os.path.normpath(Path(*fixed))) if fixed else Path(".")


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
