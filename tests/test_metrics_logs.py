"""Metrics exposition and structured logs: what an operator's scraper and log pipeline see."""
from __future__ import annotations

import asyncio
import io
import json
import os
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.logs import JsonFormatter, configure_logging, redact, request_id_var
from server.metrics import Metrics


def _samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    families = text_string_to_metric_families(metrics.render().decode())
    return {(s.name, frozenset(s.labels.items())): s.value for family in families for s in family.samples}


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return _samples(metrics).get((name, frozenset(labels.items())))


# --- metrics ------------------------------------------------------------------------------

def test_requests_are_counted_by_model_provider_and_status() -> None:
    metrics = Metrics()
    metrics.observe_request("real-esrgan-x4plus", "local", 200, 1.5)
    metrics.observe_request("real-esrgan-x4plus", "local", 200, 0.2)
    metrics.observe_request("topaz", "fal", 502, 30.0)
    assert _value(metrics, "loupe_requests_total", model="real-esrgan-x4plus", provider="local", status="200") == 2
    assert _value(metrics, "loupe_requests_total", model="topaz", provider="fal", status="502") == 1
    assert _value(metrics, "loupe_requests_total", model="topaz", provider="fal", status="200") is None


def test_latency_histogram() -> None:
    metrics = Metrics()
    metrics.observe_request("m", "local", 200, 0.3)
    metrics.observe_request("m", "local", 200, 45.0)
    assert _value(metrics, "loupe_request_duration_seconds_count", model="m", provider="local") == 2
    assert _value(metrics, "loupe_request_duration_seconds_sum", model="m", provider="local") == pytest.approx(45.3)
    assert _value(metrics, "loupe_request_duration_seconds_bucket", model="m", provider="local", le="0.5") == 1
    assert _value(metrics, "loupe_request_duration_seconds_bucket", model="m", provider="local", le="60.0") == 2


def test_engine_stats_are_read_at_each_scrape() -> None:
    stats: dict[str, float | None] = {"queue_depth": 3, "tiles_processed": 120, "oom_retries": 1,
                                      "gpu_memory_bytes": 2.5e9}
    metrics = Metrics()
    metrics.watch_engine(lambda: stats)
    assert _value(metrics, "loupe_queue_depth") == 3
    assert _value(metrics, "loupe_tiles_processed_total") == 120
    assert _value(metrics, "loupe_oom_retries_total") == 1
    assert _value(metrics, "loupe_gpu_memory_bytes") == 2.5e9
    stats.update(queue_depth=0, tiles_processed=480, gpu_memory_bytes=None)
    assert _value(metrics, "loupe_queue_depth") == 0
    assert _value(metrics, "loupe_tiles_processed_total") == 480
    assert "loupe_gpu_memory_bytes" not in metrics.render().decode()


def test_apps_in_one_process_keep_separate_metrics() -> None:
    first, second = Metrics(), Metrics()
    first.watch_engine(lambda: {"queue_depth": 1})
    second.watch_engine(lambda: {"queue_depth": 7})
    first.observe_request("m", "local", 200, 1.0)
    assert _value(first, "loupe_requests_total", model="m", provider="local", status="200") == 1
    assert _value(second, "loupe_requests_total", model="m", provider="local", status="200") is None
    assert (_value(first, "loupe_queue_depth"), _value(second, "loupe_queue_depth")) == (1, 7)
    assert Metrics.content_type.startswith("text/plain")


# --- logs ---------------------------------------------------------------------------------

@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_log_line_is_one_json_object_with_request_id_and_fields(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging("info")
    token = request_id_var.set("req_abc123")
    try:
        logging.getLogger("loupe.test").info("upscaled", extra={"model": "x4", "tiles": 16, "size": (512, 512)})
    finally:
        request_id_var.reset(token)
    logging.getLogger("loupe.test").info("outside a request")
    logging.getLogger("loupe.test").debug("below the level")
    first, second = _lines(capsys.readouterr().err)
    assert first["message"] == "upscaled"
    assert first["level"] == "info"
    assert first["logger"] == "loupe.test"
    assert first["request_id"] == "req_abc123"
    assert (first["model"], first["tiles"], first["size"]) == ("x4", 16, [512, 512])
    assert "time" in first
    assert second["message"] == "outside a request"
    assert "request_id" not in second


def test_each_task_logs_its_own_request_id(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    log = logging.getLogger("loupe.test")

    async def handle(request_id: str) -> None:
        request_id_var.set(request_id)
        for step in range(3):
            log.info("step", extra={"step": step, "expected": request_id})
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(handle("req_one"), handle("req_two"))

    asyncio.run(main())
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 6
    assert all(line["request_id"] == line["expected"] for line in lines)


def test_secrets_never_reach_the_log(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    fal_key, api_key = "fal-key-1234:abcd", 'sk-"quoted"\\key'
    configure_logging("debug", secrets=[fal_key, api_key, None])
    log = logging.getLogger("loupe.test")
    log.info("calling fal with %s", fal_key, extra={"headers": {"Authorization": f"Key {fal_key}"}, "keys": [api_key]})
    try:
        raise RuntimeError(f"upstream refused {api_key}")
    except RuntimeError:
        log.exception("remote failed")
    text = capsys.readouterr().err
    assert fal_key not in text and "1234:abcd" not in text
    assert api_key not in text and json.dumps(api_key)[1:-1] not in text
    first, second = _lines(text)
    assert first["message"] == "calling fal with [REDACTED]"
    assert first["headers"] == {"Authorization": "Key [REDACTED]"}
    assert first["keys"] == ["[REDACTED]"]
    assert "RuntimeError: upstream refused [REDACTED]" in str(second["exception"])


def test_configure_logging_is_idempotent(restore_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    configure_logging("warning")
    log = logging.getLogger("loupe.test")
    log.info("hidden")
    log.warning("shown once")
    assert [line["message"] for line in _lines(capsys.readouterr().err)] == ["shown once"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="verbose"):
        configure_logging("verbose")


def test_redact() -> None:
    assert redact("key=abc and abcdef", ["abc", "abcdef"]) == "key=[REDACTED] and [REDACTED]"
    assert redact("nothing to hide", []) == "nothing to hide"
    assert redact("empty secrets are ignored", ["", None]) == "empty secrets are ignored"


def test_redaction_blanks_whole_tokens_only() -> None:
    key, half = "sk-0123456789abcdef", "abcdefgh"
    text = f"Bearer {key}, ({key}). key={key}; the words around it and inside a longer sk-0123456789abcdefXYZ stay"
    assert redact(text, [key]) == ("Bearer [REDACTED], ([REDACTED]). key=[REDACTED]; the words around it and inside "
                                   "a longer sk-0123456789abcdefXYZ stay")
    # fal's `id:secret` halves are blanked as tokens too, never as letters inside other words.
    assert redact(f"Key 12345678:{half} and {half}, but not xabcdefghx", [f"12345678:{half}"]) == \
        "Key [REDACTED] and [REDACTED], but not xabcdefghx"


def test_a_file_name_that_is_not_utf8_is_logged_as_escapes(restore_logging: None,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info")
    logging.getLogger("loupe.test").warning("odd file", extra={"file": os.fsdecode(b"caf\xe9.png")})
    (line,) = _lines(capsys.readouterr().err)
    assert line["file"] == "caf\\udce9.png"


def test_formatter_copes_with_values_json_cannot_hold() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(secrets=["hunter2"]))
    record = logging.LogRecord("loupe.test", logging.INFO, __file__, 1, "odd values", None, None)
    record.path = Path("/tmp/hunter2.png")
    record.blob = b"\x00\xff"
    handler.emit(record)
    entry = json.loads(stream.getvalue())
    assert entry["path"] == "/tmp/[REDACTED].png"
    assert isinstance(entry["blob"], str)
