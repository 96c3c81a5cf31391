"""Optional CPU inference backends against plain torch: eager layouts, torch.compile and OpenVINO.

    python -m scripts.bench_backends                      # both cases, ~20 min on 2 EPYC cores
    python -m scripts.bench_backends --case animevideov3 --rounds 5

One forward pass of a real Real-ESRGAN network (loaded with spandrel) over the astronaut photo, resized with
Lanczos: x4plus at 240×160 and realesr-animevideov3-x4 at 480×320 (W×H). Contenders, all under
torch.inference_mode() and torch.set_num_threads(--threads); OpenVINO keeps its default threads:

- torch fp32 NCHW, fp32 channels_last, bf16 channels_last (eager);
- torch.compile (inductor, dynamic=False) of the bf16 and the fp32 channels_last model; the first call (compile
  plus one pass, inductor's cache in a fresh directory) is its compile time, not a timed call; one that takes
  over --compile-timeout is killed and left out;
- OpenVINO: `convert_model` with the exact input shape, and with dynamic N/H/W, each saved as IR and compiled for
  "CPU" with INFERENCE_PRECISION_HINT bf16 and f32; compile/convert time is convert_model + read_model +
  compile_model. The notes add compile time with CACHE_DIR (cold, then from the cache in a fresh Core).

Each contender lives in its own process (spawned, so torch's OpenMP, inductor's OpenMP and OpenVINO's TBB pools
never share one), set up one at a time and warmed up (1 call for x4plus, 2 for animevideov3); then they run
round-robin, every contender once a round and the start moving one along each round, for 3 (x4plus) or 5 rounds,
one process busy at a time. The table gives the median; "×" columns are speed-ups (the baseline's median over
the contender's). PSNR is of the uint8-rounded output against torch fp32 NCHW's, 32 output px per border left out.
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
import spandrel
import torch
from PIL import Image

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
PSNR_BORDER = 32  # output pixels left out at each border
BASELINE, BF16_EAGER = "torch fp32 NCHW", "torch bf16 channels_last"
EAGER = (BASELINE, "torch fp32 channels_last", BF16_EAGER)
COMPILED = ("torch.compile bf16 channels_last", "torch.compile fp32 channels_last")
OPENVINO = tuple(f"OpenVINO {p} {s}" for s in ("static", "dynamic") for p in ("bf16", "f32"))
SETUP_TIMEOUT_S = 1200  # eager and OpenVINO set-up (OpenVINO's convert_model of x4plus takes ~2 min)


@dataclass(frozen=True)
class Case:
    name: str
    weight: str
    size: tuple[int, int]  # input W×H
    rounds: int
    warmup: int  # untimed calls per contender before the rounds


CASES = {
    "x4plus": Case("x4plus", "realesrgan-x4plus", (240, 160), rounds=3, warmup=1),
    "animevideov3": Case("animevideov3", "realesr-animevideov3-x4", (480, 320), rounds=5, warmup=2),
}


@dataclass
class Runner:
    """A contender set up inside its worker process."""
    forward: Callable[[], Any]  # one pass over the case's input; returns the raw output
    to_uint8: Callable[[Any], np.ndarray]  # raw output → HWC uint8
    setup_s: float | None = None
    notes: list[str] = field(default_factory=list)


def load_model(case: Case) -> torch.nn.Module:
    return spandrel.ModelLoader(device="cpu").load_from_file(WEIGHTS_DIR / f"{case.weight}.safetensors").model.eval()


def input_tensor(case: Case) -> torch.Tensor:
    """The astronaut at the case's size, float32 NCHW in [0, 1]."""
    image = np.array(Image.fromarray(skimage.data.astronaut()).convert("RGB").resize(case.size, Image.LANCZOS))
    return torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0).float().div(255).contiguous()


def torch_to_uint8(out: torch.Tensor) -> np.ndarray:
    return (out[0].float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def numpy_to_uint8(out: np.ndarray) -> np.ndarray:
    return (np.clip(out[0].astype(np.float32), 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


def psnr(a: np.ndarray, b: np.ndarray, border: int = PSNR_BORDER) -> float:
    a, b = (x[border:-border, border:-border].astype(np.float64) for x in (a, b))
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def torch_runner(name: str, case: Case) -> Runner:
    """Eager or torch.compile; a compiled runner's setup_s is its first call."""
    x = input_tensor(case)
    model = load_model(case)
    if "bf16" in name:
        model, x = model.to(torch.bfloat16), x.to(torch.bfloat16)
    if "channels_last" in name:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    if name not in COMPILED:
        return Runner(lambda: model(x), torch_to_uint8)
    compiled = torch.compile(model, backend="inductor", dynamic=False)
    start = time.perf_counter()
    compiled(x)
    return Runner(lambda: compiled(x), torch_to_uint8, time.perf_counter() - start)


def convert_openvino(case: Case, ir_dir: str) -> Runner:
    """convert_model with the static and the dynamic shape, saved as IR; notes on compile time and the cache."""
    import openvino as ov

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")  # convert_model traces
    x, model, notes = input_tensor(case), load_model(case), []
    for shape, dims in (("static", list(x.shape)), ("dynamic", [-1, 3, -1, -1])):
        start = time.perf_counter()
        ov_model = ov.convert_model(model, example_input=x, input=[ov.PartialShape(dims)])
        convert_s = time.perf_counter() - start
        ov.save_model(ov_model, Path(ir_dir) / f"{shape}.xml", compress_to_fp16=False)  # keep f32 weights
        (Path(ir_dir) / f"{shape}.convert_s").write_text(f"{convert_s}")
        notes.append(f"OpenVINO convert_model, {shape} shape {dims}: {convert_s:.1f} s")
    # One cache directory per precision: the CPU plugin's blob does not depend on INFERENCE_PRECISION_HINT (a bf16
    # compile's blob serves an f32 one), so a shared directory would make the second precision's "cold" a hit.
    for precision in ("bf16", "f32"):
        with tempfile.TemporaryDirectory(prefix="ov-cache-") as cache_dir:
            timings, hits = [], []
            for _ in ("cold", "warm"):
                core = ov.Core()
                core.set_property({"CACHE_DIR": cache_dir})
                start = time.perf_counter()
                compiled = core.compile_model(Path(ir_dir) / "static.xml", "CPU",
                                              {"INFERENCE_PRECISION_HINT": precision})
                timings.append(time.perf_counter() - start)
                hits.append(compiled.get_property("LOADED_FROM_CACHE"))
            notes.append(f"OpenVINO {precision} static read+compile with CACHE_DIR: cold {timings[0]:.2f} s, "
                         f"again in a fresh Core {timings[1]:.2f} s (LOADED_FROM_CACHE {hits[0]}, {hits[1]}; "
                         f"cache files: {len(os.listdir(cache_dir))})")
    return Runner(lambda: None, lambda out: np.zeros(0, np.uint8), notes=notes)


def openvino_runner(name: str, case: Case, ir_dir: str) -> Runner:
    import openvino as ov

    _, precision, shape = name.split()
    x = input_tensor(case).numpy()
    start = time.perf_counter()
    core = ov.Core()
    compiled = core.compile_model(core.read_model(Path(ir_dir) / f"{shape}.xml"), "CPU",
                                  {"INFERENCE_PRECISION_HINT": precision})
    compile_s = time.perf_counter() - start
    request = compiled.create_infer_request()

    def forward() -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()
    actual = compiled.get_property("INFERENCE_PRECISION_HINT")
    convert_s = float((Path(ir_dir) / f"{shape}.convert_s").read_text())
    return Runner(forward, numpy_to_uint8, convert_s + compile_s,
                  [f"{name}: read+compile {compile_s:.2f} s, the plugin reports INFERENCE_PRECISION_HINT={actual}"])


def worker(name: str, case: Case, ir_dir: str, threads: int, conn: Connection) -> None:
    """Set the contender up, then serve "run" (→ seconds), "output" (→ HWC uint8) and "quit"."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="inductor-bench-") as inductor_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_dir  # a cold compile, not a hit from an earlier run
        serve(name, case, ir_dir, conn)


def serve(name: str, case: Case, ir_dir: str, conn: Connection) -> None:
    try:
        with torch.inference_mode():
            if name == "convert":
                runner = convert_openvino(case, ir_dir)
            elif name.startswith("OpenVINO"):
                runner = openvino_runner(name, case, ir_dir)
            else:
                runner = torch_runner(name, case)
    except Exception as error:
        conn.send(("error", f"{type(error).__name__}: {error}"))
        return
    conn.send(("ready", runner.setup_s, runner.notes))
    output = None
    with torch.inference_mode():
        while (message := conn.recv()) != "quit":
            if message == "run":
                start = time.perf_counter()
                output = runner.forward()
                conn.send(time.perf_counter() - start)
            else:
                conn.send(runner.to_uint8(output))


@dataclass
class Contender:
    """A contender's worker process, seen from the parent."""
    name: str
    process: Any
    conn: Connection
    setup_s: float | None = None
    times: list[float] = field(default_factory=list)

    def run(self) -> float:
        self.conn.send("run")
        return self.conn.recv()

    def output(self) -> np.ndarray:
        self.conn.send("output")
        return self.conn.recv()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send("quit")
            self.process.join(30)


def start(name: str, case: Case, ir_dir: str, threads: int, timeout_s: float, notes: list[str]) -> Contender | None:
    """Spawn a contender's worker and wait for its set-up; kill it and note why if it fails or times out."""
    parent, child = mp.get_context("spawn").Pipe()
    process = mp.get_context("spawn").Process(target=worker, args=(name, case, ir_dir, threads, child), daemon=True)
    began = time.perf_counter()
    process.start()
    if not parent.poll(timeout_s):
        process.kill()
        process.join()
        notes.append(f"{name}: left out, set-up still running after {time.perf_counter() - began:.0f} s")
        return None
    reply = parent.recv()
    if reply[0] == "error":
        process.join()
        notes.append(f"{name}: left out, {reply[1]}")
        return None
    notes.extend(reply[2])
    print(f"  {name}: ready in {time.perf_counter() - began:.1f} s", flush=True)
    return Contender(name, process, parent, reply[1])


def table(case: Case, contenders: list[Contender], outputs: dict[str, np.ndarray], notes: list[str]) -> str:
    medians = {c.name: statistics.median(c.times) for c in contenders}
    w, h = case.size
    lines = [f"### {case.weight}, {w}×{h} → {4 * w}×{4 * h}, median of {case.rounds} rounds", "",
             f"| contender | median s | × {BASELINE} | × {BF16_EAGER} | PSNR dB | compile/convert s |",
             "|---|---:|---:|---:|---:|---:|"]
    for c in contenders:
        setup = "" if c.setup_s is None else f"{c.setup_s:.1f}"
        speedup = {base: f"{medians[base] / medians[c.name]:.2f}" if base in medians else "–"
                   for base in (BASELINE, BF16_EAGER)}
        quality = f"{psnr(outputs[c.name], outputs[BASELINE]):.1f}" if BASELINE in outputs else "–"
        lines.append(f"| {c.name} | {medians[c.name]:.3f} | {speedup[BASELINE]} | {speedup[BF16_EAGER]} | "
                     f"{quality} | {setup} |")
    lines += [""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def bench(case: Case, names: list[str], threads: int, compile_timeout_s: int) -> str:
    notes: list[str] = []
    contenders: list[Contender] = []
    with tempfile.TemporaryDirectory(prefix="ov-ir-") as ir_dir:
        try:
            if any(name in OPENVINO for name in names):
                converter = start("convert", case, ir_dir, threads, SETUP_TIMEOUT_S, notes)
                if converter is None:
                    names = [name for name in names if name not in OPENVINO]
                else:
                    converter.close()
            for name in names:
                timeout = compile_timeout_s if name in COMPILED else SETUP_TIMEOUT_S
                if (contender := start(name, case, ir_dir, threads, timeout, notes)) is not None:
                    for _ in range(case.warmup):
                        contender.run()
                    contenders.append(contender)
            for r in range(case.rounds):
                for i in range(len(contenders)):
                    contender = contenders[(i + r) % len(contenders)]
                    contender.times.append(contender.run())
                print(f"  round {r + 1}/{case.rounds}: " +
                      ", ".join(f"{c.name} {c.times[-1]:.2f}" for c in contenders), flush=True)
            outputs = {c.name: c.output() for c in contenders}
        finally:
            for contender in contenders:
                contender.close()
    return table(case, contenders, outputs, notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), nargs="+", default=list(CASES))
    parser.add_argument("--rounds", type=int, help="rounds per case (default: 3 for x4plus, 5 for animevideov3)")
    parser.add_argument("--warmup", type=int, help="untimed calls per contender (default: 1 x4plus, 2 animevideov3)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--compile-timeout", type=int, default=300, help="seconds for torch.compile's first call")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile")
    parser.add_argument("--no-openvino", action="store_true", help="leave out OpenVINO")
    args = parser.parse_args()

    try:
        import openvino
        ov_version = openvino.__version__
    except ImportError:
        ov_version, args.no_openvino = "not installed", True
    names = list(EAGER) + ([] if args.no_compile else list(COMPILED)) + ([] if args.no_openvino else list(OPENVINO))
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  {platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch {torch.__version__} ({args.threads} threads), openvino {ov_version}\n", flush=True)
    for case in (CASES[name] for name in args.case):
        case = replace(case, rounds=args.rounds or case.rounds,
                       warmup=case.warmup if args.warmup is None else args.warmup)
        print(f"{case.weight} {case.size[0]}×{case.size[1]}", flush=True)
        print("\n" + bench(case, names, args.threads, args.compile_timeout) + "\n", flush=True)


if __name__ == "__main__":
    main()
