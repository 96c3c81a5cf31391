"""Pydantic models for what crosses the wire: the edit form, responses and errors.

They follow OpenAI's images API and the hosted gateway's additions (`metadata`,
dry runs); nothing in here knows how an image is upscaled.
"""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.jobs import parse_size
from server.request_store import Status as RequestStatus


class EditForm(BaseModel):
    """The non-file fields of `POST /v1/images/edits`, as the openai SDK sends them (strings in a multipart form)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    model: str = Field(min_length=1, max_length=200, description="Model id, e.g. realesrgan-x4plus")
    scale_factor: float | None = Field(default=None, description="Output size ÷ input size, per axis; > 0")
    prompt: str | None = Field(default=None, max_length=32000, description="Guidance; ignored by models that take none")
    size: str | None = Field(default=None, description="Target size WxH; must keep the input's aspect ratio")
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "jpg", "webp", "gif", "avif"] | None = None
    output_compression: int | None = Field(default=None, ge=0, le=100)
    n: int = Field(default=1, ge=1, le=10)
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    webhook_url: str | None = Field(default=None, description="Run async (answered 202) and POST the request "
                                    "object here, signed per Standard Webhooks, when it ends")

    @field_validator("scale_factor")
    @classmethod
    def _finite_positive(cls, value: float | None) -> float | None:
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise ValueError("scale_factor must be a finite number greater than 0")
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and parse_size(value) is None:
            raise ValueError("size must look like 2048x1536")
        return value

    def size_pixels(self) -> tuple[int, int] | None:
        return parse_size(self.size or "")


class ImageData(BaseModel):
    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None


class Metadata(BaseModel):
    model: str
    executed_model: str
    provider: str
    provider_name: str
    cost: float
    cost_currency: str = "USD"


class ImagesResponse(BaseModel):
    created: int
    size: str
    data: list[ImageData]
    metadata: Metadata


class CostComponent(BaseModel):
    type: Literal["input", "output"]
    metric: str
    quantity: float
    billable_quantity: float
    unit_price: float
    total_cost: int  # micro-USD


class DryRunResponse(BaseModel):
    """The gateway's dry-run fields, then Loupe's additions."""

    estimated: bool = True
    model: str
    provider: str
    total_cost_micros: int
    currency: str = "USD"
    components: list[CostComponent]
    size: str | None
    executed_model: str
    plan: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    description: str
    aliases: list[str]
    alias_of: str | None = None  # for a gateway id such as `real-esrgan`: the model it names
    default_scale: float
    runnable: bool
    where: Literal["local", "fal", "gateway"] | None
    local: dict[str, Any] | None
    remote: list[str]
    price: dict[str, Any] | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AsyncAccepted(BaseModel):
    """The 202 answer to an async edit; its status is then at `GET /v1/requests/{id}`."""

    id: str
    object: Literal["image.request"] = "image.request"
    status: RequestStatus
    created: int
    model: str


class WebhookAttempt(BaseModel):
    attempt: int
    at: float
    seconds: float
    status_code: int | None
    error: str | None
    delivered: bool


class RequestObject(BaseModel):
    """A request's record: `result` is the body a sync edit returns, `error` an OpenAI error object."""

    id: str
    object: Literal["image.request"] = "image.request"
    status: RequestStatus
    created: int
    started_at: int | None
    completed_at: int | None
    model: str
    executed_model: str | None
    provider: str | None
    cost: float | None
    result: dict[str, Any] | None
    error: ErrorDetail | None
    webhook_url: str | None = None
    webhook_attempts: list[WebhookAttempt] = []


class RequestList(BaseModel):
    object: Literal["list"] = "list"
    data: list[RequestObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class WebhookSecret(BaseModel):
    secret: str
