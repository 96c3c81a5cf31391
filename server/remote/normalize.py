"""A Job in a provider's words: each request field reaches it in one of four ways.

- passthrough: `job.extra` (creativity, resemblance, enable_safety_checker, num_inference_steps, anything
  unknown) goes under its own name, the form's strings turned into numbers or booleans, bounded by the
  app's `ranges`.
- renamed: scale_factor becomes the app's `FalRoute.scale_field`; prompt, seed and common names the app
  spells differently go through `FalRoute.renamed` (prompt and seed only to apps listed there).
- converted: the image file becomes the app's `image_url`, re-encoded for apps that take only some formats:
  a `data:` URI, or, when its bytes exceed LOUPE_FAL_UPLOAD_THRESHOLD_BYTES, the URL of a fal storage upload
  (done by the provider, once for all n calls); `size` is already job.scale, and a scale the app can't take is
  a 400 naming the allowed range.
- emulated: n is n parallel calls (seed, seed+1, ...); response_format, output_format and
  output_compression are done by Loupe's result encoder, so none of them is sent.

The per-model table is the model's `FalRoute` row in `server/catalog.py`. The
gateway speaks Loupe's own protocol, so it gets the fields as they came.
"""
from __future__ import annotations

import base64
import io
import math
import re

from PIL import Image

from server.catalog import FalRoute, ParamRange
from server.errors import InvalidInput
from server.jobs import Job, SourceImage

_INTEGER = re.compile(r"[+-]?\d+")


def coerce(raw: str) -> bool | int | float | str:
    """A form field's string as the JSON value it most plausibly means: "true" → True, "18" → 18, "0.5" → 0.5."""
    text = raw.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if _INTEGER.fullmatch(text):
        return int(text)
    try:
        number = float(text)
    except ValueError:
        return raw
    return number if math.isfinite(number) else raw


def _scale_param(job: Job) -> str:
    return "size" if job.size_given else "scale_factor"


def check_scale(job: Job, allowed: ParamRange, where: str) -> None:
    """A 400 unless the job's scale is one the model takes on the provider named by `where`."""
    if not allowed.allows(job.scale):
        raise InvalidInput(
            f"{job.requested_model} on {where} takes a scale_factor {allowed.describe()}; this request asks for "
            f"{job.scale:g}",
            _scale_param(job),
        )


def _check_fixed_scale(job: Job, route: FalRoute) -> None:
    if route.fixed_scale is None or not job.scale_given:
        return
    if not ParamRange(choices=(route.fixed_scale,)).allows(job.scale):
        raise InvalidInput(
            f"{job.requested_model} on fal.ai only upscales by {route.fixed_scale:g}; this request asks for "
            f"{job.scale:g}",
            _scale_param(job),
        )


def _json_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def fal_params(job: Job, route: FalRoute) -> dict[str, object]:
    """Everything the fal app gets except the image and the per-call seed; raises the client's 400s."""
    params: dict[str, object] = dict(route.defaults)
    if route.scale_field is None:
        _check_fixed_scale(job, route)
    else:
        check_scale(job, route.scale, "fal.ai")
        params[route.scale_field] = _json_number(job.scale)
    prompt_field = route.renamed.get("prompt")
    if prompt_field and job.prompt:
        params[prompt_field] = job.prompt
    filled_by_loupe = {"image_url", route.scale_field}
    for name, raw in job.extra.items():
        upstream = route.renamed.get(name, name)
        if upstream in filled_by_loupe:
            raise InvalidInput(f"`{name}` is set by Loupe: send the image as `image` and the scale as scale_factor", name)
        value = coerce(raw)
        allowed = route.ranges.get(upstream)
        if allowed is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidInput(f"`{name}` must be a number {allowed.describe()}; got {raw!r}", name)
            if not allowed.allows(value):
                raise InvalidInput(f"`{name}` must be {allowed.describe()} for {job.requested_model}; got {raw}", name)
        params[upstream] = value
    return params


def fal_inputs(job: Job, route: FalRoute, params: dict[str, object], image_url: str) -> list[dict[str, object]]:
    """The JSON input of each of the job's n calls: the app's `params` (from fal_params) and the image."""
    params = {**params, "image_url": image_url}
    seed_field = route.renamed.get("seed")
    if seed_field is None or job.seed is None:
        return [params] * job.n
    # Distinct seeds make the n images differ, the way n does on a provider that supports it.
    return [{**params, seed_field: job.seed + i} for i in range(job.n)]


def fal_image(image: SourceImage, accepted: tuple[str, ...]) -> tuple[bytes, str]:
    """The image's bytes and media type as the app takes them (CPU work: run it off the event loop)."""
    if accepted and image.format not in accepted:
        return _reencode(image.data, accepted[0]), f"image/{accepted[0].lower()}"
    return image.data, image.media_type


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _reencode(data: bytes, pillow_format: str) -> bytes:
    with Image.open(io.BytesIO(data)) as picture:
        picture.load()
        converted = picture.convert("RGB") if picture.mode == "CMYK" else picture
        out = io.BytesIO()
        converted.save(out, format=pillow_format)
    return out.getvalue()


def gateway_form(job: Job) -> dict[str, str]:
    """The multipart fields for the gateway, which answers Loupe's own protocol (the image travels as a file).

    Asking for b64_json spares a second download; the client's response_format and
    output_format are still applied by Loupe's result encoder.
    """
    form = dict(job.extra)
    form.update(
        model=job.requested_model,
        scale_factor=str(_json_number(job.scale)),
        n=str(job.n),
        response_format="b64_json",
    )
    if job.prompt:
        form["prompt"] = job.prompt
    if job.seed is not None:
        form["seed"] = str(job.seed)
    if job.user:
        form["user"] = job.user
    return form
