"""A tiled 10K output stays within bounded host memory: no full-size float canvas, only a band of rows."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server.config import PROJECT_ROOT

GIB = 1 << 30

_CHILD = """
import json, resource, sys
from pathlib import Path
import numpy as np, torch
from server import catalog
from server.config import Settings
from server.engine.runtime import LocalEngine
from server.imaging import Picture
from tests.tiny_models import write_tiny_weights

torch.set_num_threads(2)
weights = write_tiny_weights(Path(sys.argv[1]) / "weights")
engine = LocalEngine(Settings.model_validate({"weights_dir": weights, "data_dir": Path(sys.argv[1]) / "data",
                                              "device": "cpu", "compile": False, "tile_size": 512}))
entry = catalog.find("realesr-animevideov3")
picture = Picture(np.random.default_rng(0).integers(0, 256, (2560, 2560, 3), dtype=np.uint8))
small = Picture(picture.pixels[:8, :8].copy())
engine.upscale_sync(engine.plan(entry, small, (32, 32)), small)  # the model is loaded: not counted
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = engine.upscale_sync(engine.plan(entry, picture, (10240, 10240)), picture)[0].pixels
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after, "shape": list(out.shape), "dtype": str(out.dtype),
                  "tiles": engine.stats()["tiles_processed"], "spread": int(out[::97, ::97].std() > 5)}))
"""


def test_a_2560_to_10240_job_stays_well_within_2_gib_of_host_memory(tmp_path: Path) -> None:
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=PROJECT_ROOT, capture_output=True,
                           text=True, timeout=300)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["shape"] == [10240, 10240, 3] and report["dtype"] == "uint8"
    assert report["spread"] == 1  # an image came out, not a blank canvas
    grown = report["after"] - report["before"]
    # The uint8 output alone is 0.3 GiB; a float32 canvas would add 1.2 GiB more, and a weight canvas 0.4.
    assert grown < 1.5 * GIB, f"peak RSS grew by {grown / GIB:.2f} GiB over {report['tiles']} tiles"
