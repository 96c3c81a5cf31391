"""Structured logs: one JSON object a line, tagged with the request being served, secrets blanked out.

Fields passed as `logger.info("...", extra={...})` become keys of the object; the
request id comes from `request_id_var`, which the HTTP middleware sets per request.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import Settings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

REDACTED = "[REDACTED]"
_TOKEN = r"[A-Za-z0-9_\-]"  # what a secret may not touch to count as a whole token
# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


class Redactor:
    """Replaces each non-empty secret in a text by [REDACTED] where it stands as a whole token (not inside a longer
    word, so a short secret can't blank the same letters everywhere): for log lines, and for anything an upstream
    says that a client will read."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        parts: set[str] = set()
        for secret in filter(None, secrets):
            parts.add(secret)
            # fal's split credentials are `key_id:key_secret`; either half alone is still sensitive.
            parts.update(half for half in secret.split(":") if len(half) >= 8)
        # Longest first, so a secret that contains another is blanked whole.
        alternatives = "|".join(re.escape(part) for part in sorted(parts, key=len, reverse=True))
        self._pattern = re.compile(f"(?<!{_TOKEN})(?:{alternatives})(?!{_TOKEN})") if parts else None

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text) if self._pattern is not None else text


def redact(text: str, secrets: Iterable[str | None]) -> str:
    return Redactor(secrets)(text)


class JsonFormatter(logging.Formatter):
    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        super().__init__()
        self.redact = Redactor(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update((key, value) for key, value in vars(record).items() if key not in _RECORD_ATTRIBUTES)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(self._plain(entry), ensure_ascii=False)

    def _plain(self, value: object) -> object:
        """`value` as JSON types, each string redacted (before encoding, so escaping cannot hide a secret)."""
        if isinstance(value, str):
            # Lone surrogates (a file name that isn't UTF-8) are written as escapes: stderr can't encode them.
            return self.redact(value.encode("utf-8", "backslashreplace").decode("utf-8"))
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, Mapping):
            return {self._plain(str(key)): self._plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple, set, frozenset)):
            return [self._plain(item) for item in value]
        return self.redact(str(value))


class _JsonHandler(logging.StreamHandler):
    """The handler configure_logging installs, told apart from handlers others installed."""


def configure_logging(level: str, *, secrets: Iterable[str | None] = ()) -> None:
    """Send every log record, uvicorn's included, to stderr as JSON lines at `level` ("info", "debug", ...)."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}: use debug, info, warning, error or critical")
    handler = _JsonHandler()
    handler.setFormatter(JsonFormatter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _JsonHandler)] + [handler]
    root.setLevel(numeric)
    for name in _SERVER_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.propagate = True


def configure_logging_for(settings: Settings) -> None:
    """`configure_logging` at the settings' level, with every secret they hold redacted."""
    configure_logging(settings.log_level,
                      secrets=[*settings.api_keys, settings.fal_key, settings.gateway_key, settings.webhook_secret])
