"""Loupe on Ray: Serve for the API (`loupe serve --ray`), Data for folder batches (`loupe upscale --ray`).

Ray is an optional extra (`pip install -e '.[ray]'`): nothing outside this package imports it.
"""
from __future__ import annotations

import importlib.util

from server.config import SettingsError

INSTALL_HINT = "pip install -e '.[ray]' (it brings ray[serve,data] 2.60)"


def require_ray() -> None:
    """A SettingsError that says how to install Ray, when it isn't."""
    try:
        import ray  # noqa: F401
    except ImportError as missing:
        raise SettingsError(f"--ray needs Ray, which is not installed ({missing}): {INSTALL_HINT}") from None
    for part in ("ray.serve", "ray.data"):
        if importlib.util.find_spec(part) is None:
            raise SettingsError(f"--ray needs {part}, which this Ray lacks: {INSTALL_HINT}")
