"""What the weights folder offers: the models a name means, whether each can run, and how it would run on a device.

Knows files, not devices: `LocalEngine` answers from it for its own devices, and a cluster's ingress (which
sees the same weights folder as its replicas) answers from it for the replicas' device.
"""
from __future__ import annotations

import torch

from server import catalog
from server.catalog import ModelEntry
from server.config import Settings
from server.engine import custom
from server.engine.models import execution_for, fetch_hint, locate
from server.engine.precision import Execution
from server.engine.weights import MANIFEST, shown
from server.errors import Unavailable


# How long a request waits for a new custom file's first inspection, and a listing for any under way.
LOOKUP_WAIT_S = 30.0
LISTING_WAIT_S = 5.0


class ModelDirectory:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def find(self, name: str) -> ModelEntry | None:
        """A catalog model by id or alias, else a custom model of that name (runnable or not), once inspected.
        Waits for the inspection: for the CLI and worker threads."""
        entry = catalog.find(name)
        if entry is not None:
            return entry
        found = custom.find(self.settings.weights_dir, name)
        return found.entry if found is not None else None

    async def lookup(self, name: str) -> ModelEntry | None:
        """`find` for the event loop: a custom file still being read after LOOKUP_WAIT_S is a retryable 503."""
        entry = catalog.find(name)
        if entry is not None:
            return entry
        found = await custom.find_async(self.settings.weights_dir, name, LOOKUP_WAIT_S)
        if found is not None and found.pending:
            raise Unavailable(f"the custom model {name} is still {custom.BEING_READ}", "model",
                              code="MODEL_LOADING", retry_after_s=5)
        return found.entry if found is not None else None

    def custom_entry(self, name: str) -> ModelEntry | None:
        """The custom model `name` as inspected so far, without waiting: for the event loop."""
        found = custom.find(self.settings.weights_dir, name, wait_s=0)
        return found.entry if found is not None else None

    def custom_models(self) -> list[custom.CustomModel]:
        """The files in the custom folder now, runnable or not (each with its reason), every one inspected."""
        return custom.scan(self.settings.weights_dir, catalog.NAMES)

    async def list_custom(self, wait_s: float = LISTING_WAIT_S) -> list[custom.CustomModel]:
        """`custom_models` for the event loop: a file still being read after `wait_s` is listed as such."""
        return await custom.scan_async(self.settings.weights_dir, catalog.NAMES, wait_s)

    def unavailable_reason(self, entry: ModelEntry) -> str | None:
        """None when `entry`'s weights are here and usable; else why not, and the command that fixes it."""
        if entry.local is None:
            return f"{entry.id} has no local weights"
        weights_dir = self.settings.weights_dir
        if entry.owned_by == "custom":
            found = custom.find(weights_dir, entry.id, wait_s=0)  # `lookup` waited for its inspection
            if found is None:
                folder = shown(weights_dir / custom.FOLDER, weights_dir)
                return f"the file of the custom model {entry.id} is gone from {folder}"
            return found.reason
        missing = [w for w in entry.local.weights.values() if locate(w, weights_dir) is None]
        if missing:
            fixes = " and ".join(fetch_hint(w, weights_dir) for w in missing)
            return f"the weights {', '.join(missing)} are not in {shown(weights_dir, weights_dir)}: run {fixes}"
        return None

    def inspected(self, weight_id: str) -> custom.CustomModel | None:
        """A custom weight's inspection; None for a built-in one."""
        if weight_id in MANIFEST:
            return None
        return custom.find(self.settings.weights_dir, weight_id.removeprefix(custom.PREFIX), wait_s=0)

    def execution(self, weight_id: str, device: torch.device, native_bf16: bool | None = None) -> Execution:
        """How `weight_id` would run on `device` (`native_bf16`: that device's, when it is another machine's)."""
        setting = self.settings.precision
        if weight_id in MANIFEST:
            return execution_for(MANIFEST[weight_id].architecture, device, setting, native_bf16=native_bf16)
        inspected = self.inspected(weight_id)
        architecture = (inspected.architecture or "?") if inspected is not None else "?"
        return execution_for(architecture, device, setting, inspected.traits if inspected is not None else None,
                             native_bf16)
