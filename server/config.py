"""Every LOUPE_* setting, read once from the environment and passed down."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic import field_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent

PrecisionSetting = Literal["auto", "fp32", "bf16", "fp16"]
DEFAULT_MAX_WEIGHT_BYTES = 4 << 30  # a weight file downloaded by `loupe weights add URL` or `pull`
MIN_API_KEY_LENGTH = 16  # shorter keys are guessable, and would blank their characters out of every log line
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class SettingsError(ValueError):
    """A setting that this machine can't honour (LOUPE_DEVICE=cuda without a GPU, fp16 on the CPU): a start-up error."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LOUPE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    log_level: str = "info"  # debug, info, warning, error or critical

    # Local engine
    device: Literal["auto", "cpu", "cuda"] = "auto"
    weights_dir: Path = PROJECT_ROOT / "weights"
    tile_size: int | None = Field(default=None, ge=0)
    precision: PrecisionSetting = "auto"  # auto: the policy of server/engine/precision.py
    vram_budget: int | None = Field(default=None, ge=0, description="bytes the model cache may hold on a GPU")
    compile: bool = True
    aura_overlap: bool = True  # AuraSR's second, half-tile-shifted pass: hides its tile grid at twice the work
    request_timeout_s: float = Field(default=600.0, gt=0)
    # Estimated seconds of work queued per device past which new jobs get 429 (None: half of request_timeout_s).
    max_queue_s: float | None = Field(default=None, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)  # to receive a request's headers, and then its body

    # Ray (`--ray`): jobs an ingress holds for the Upscaler replicas before it answers 429 (Serve's
    # max_queued_requests, which Serve counts per caller), and the CPUs (torch threads) of each CPU replica.
    ray_queue: int = Field(default=8, ge=1)
    ray_replica_cpus: int = Field(default=1, ge=1)

    # Results
    data_dir: Path = PROJECT_ROOT / "data"
    result_ttl_s: int = Field(default=3600, ge=1)  # results, and the records of the requests that made them
    database_url: str | None = None  # sqlite:///<path>; None: sqlite:///<data dir>/loupe.db

    # Webhooks
    webhook_secret: str | None = None  # whsec_…; None: one generated once and kept in the data dir
    webhook_retry_s: Annotated[list[float], NoDecode] = Field(default_factory=lambda: [5.0, 15.0, 45.0])
    webhook_timeout_s: float = Field(default=30.0, gt=0)

    # Input limits
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, ge=1)
    max_output_side: int = Field(default=10240, ge=1)
    max_input_pixels: int = Field(default=64 * 1024 * 1024, ge=1)
    allow_private_urls: bool = False
    url_timeout_s: float = Field(default=30.0, gt=0)
    max_weight_bytes: int = Field(default=DEFAULT_MAX_WEIGHT_BYTES, ge=1)

    # Access
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    rate_limit: float | None = Field(default=None, gt=0, description="requests per second per API key")

    # Remote providers
    fal_url: str = "https://queue.fal.run"
    fal_key: str | None = None
    fal_storage_url: str = "https://rest.fal.ai"
    fal_upload_threshold_bytes: int = Field(default=4 * 1024 * 1024, ge=0)  # larger input images go via fal storage
    gateway_url: str | None = None
    gateway_key: str | None = None
    fallback: Literal["never", "unavailable", "overload"] = "unavailable"
    remote_timeout_s: float = Field(default=300.0, gt=0)

    @property
    def max_image_field_chars(self) -> int:
        """The longest `image` text field: an upload's largest size as a base64 data: URI, with its header.

        An url-encoded form percent-encodes the `+` and `/` of base64 (3 bytes each): about 1/16 more on
        compressed image data, allowed for with 1/8.
        """
        return -(-self.max_upload_bytes * 4 // 3) * 9 // 8 + 1024

    @property
    def queue_budget_s(self) -> float:
        """A job admitted behind a full budget still has half the request timeout to run in."""
        return self.max_queue_s if self.max_queue_s is not None else self.request_timeout_s / 2

    @field_validator("webhook_retry_s")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(not 0 <= delay < 86400 for delay in value):
            raise ValueError("each delay must be between 0 and 86400 seconds")
        return value

    @field_validator("api_keys")
    @classmethod
    def _long_enough(cls, value: list[str]) -> list[str]:
        short = [index + 1 for index, key in enumerate(value) if len(key) < MIN_API_KEY_LENGTH]
        if short:
            raise ValueError(f"each key must be at least {MIN_API_KEY_LENGTH} characters; key number "
                             f"{', '.join(map(str, short))} is shorter")
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}: use {', '.join(LOG_LEVELS)}")
        return value.lower()

    @field_validator("api_keys", "webhook_retry_s", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        """A comma-separated environment variable as a list: `a, b` → ["a", "b"]."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value
