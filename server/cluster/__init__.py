"""Loupe on Ray: Serve for the API (`loupe serve --ray`), Data for folder batches (`loupe upscale --ray`).

Ray is an optional extra (`pip install -e '.[ray]'`): nothing outside this package imports it.
"""
from __future__ import annotations

import importlib

from server.config import SettingsError

INSTALL_HINT = "pip install -e '.[ray]' (it brings ray[serve,data] 2.60)"


def require_ray() -> None:
    """A SettingsError that says how to install Ray, when it or the parts Loupe uses (and their own
    dependencies) are missing."""
    for part in ("ray", "ray.serve", "ray.data"):
        try:
            importlib.import_module(part)
        except ImportError as missing:
            raise SettingsError(f"--ray needs {part}, which can't be imported ({missing}): {INSTALL_HINT}") from None
