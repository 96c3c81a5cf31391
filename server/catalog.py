"""One declarative table: every model id Loupe answers to, and where it can run.

A row says how a model runs locally (which weight files, one per native scale),
how it is reached remotely (fal app and how its parameters are named), what
scales it takes and what it costs. Adding a model means adding a row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class LocalSpec:
    """A model Loupe runs itself. `weights` maps each native scale to a weight id (of the manifest, or a custom
    file's); what the network is, its profile says (server/engine/profiles.py)."""

    weights: dict[int, str]

    @property
    def native_scales(self) -> tuple[int, ...]:
        return tuple(sorted(self.weights))


@dataclass(frozen=True)
class ParamRange:
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[float, ...] | None = None

    def allows(self, value: float) -> bool:
        """Choices match within 0.1%: a scale derived from a `size` is off by the rounding to whole pixels."""
        if self.choices:
            return any(math.isclose(value, choice, rel_tol=1e-3) for choice in self.choices)
        if self.minimum is not None and value < self.minimum * (1 - 1e-9) - 1e-9:
            return False
        return self.maximum is None or value <= self.maximum * (1 + 1e-9) + 1e-9

    def describe(self) -> str:
        """The allowed values in words: "2 or 4", "from 1 to 8", "of at least 1", "up to 8"."""
        if self.choices:
            values = [f"{choice:g}" for choice in self.choices]
            return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " or " + values[-1]
        if self.minimum is not None and self.maximum is not None:
            return f"from {self.minimum:g} to {self.maximum:g}"
        if self.minimum is not None:
            return f"of at least {self.minimum:g}"
        return f"up to {self.maximum:g}"


@dataclass(frozen=True)
class FalRoute:
    """How one fal app names and bounds its inputs.

    `scale_field` is the app's name for the scale (None: the app takes no scale;
    its output is `fixed_scale` times the input, or whatever the app decides when
    that is None too). `renamed` maps Loupe field names to the app's, and is also
    how Loupe's own `prompt` and `seed` reach the apps that take them (an identity
    entry). `ranges` bounds numeric inputs by the app's own name. `defaults` are
    sent unless the client overrides them; `input_formats` lists the Pillow
    formats the app accepts for its image (empty: any). `output` is where the app
    puts its images.
    """

    app_id: str
    scale_field: str | None
    scale: ParamRange = ParamRange()
    fixed_scale: float | None = None
    renamed: dict[str, str] = field(default_factory=dict)
    ranges: dict[str, ParamRange] = field(default_factory=dict)
    defaults: dict[str, object] = field(default_factory=dict)
    input_formats: tuple[str, ...] = ()
    output: Literal["image", "images"] = "image"


@dataclass(frozen=True)
class Price:
    """USD. Exactly one of the three is set; tiers are (max output megapixels, price) ascending."""

    per_image: float | None = None
    per_megapixel: float | None = None
    tiers: tuple[tuple[float, float], ...] = ()
    source: str = ""

    def cost(self, output_pixels: int) -> float:
        megapixels = output_pixels / 1_000_000
        if self.per_image is not None:
            return self.per_image
        if self.per_megapixel is not None:
            return round(self.per_megapixel * megapixels, 6)
        for limit, price in self.tiers:
            if megapixels <= limit:
                return price
        return self.tiers[-1][1]


@dataclass(frozen=True)
class ModelEntry:
    id: str
    description: str
    default_scale: float
    scale: ParamRange = ParamRange()
    aliases: tuple[str, ...] = ()
    local: LocalSpec | None = None
    fal: FalRoute | None = None
    gateway: bool = True
    price: Price | None = None
    owned_by: str = "loupe"

    def cost(self, size: tuple[int, int], n: int) -> float | None:
        """USD for n outputs of `size` at the catalog price; None when the catalog has no price."""
        if self.price is None:
            return None
        return round(self.price.cost(size[0] * size[1]) * n, 6)


MODELS: tuple[ModelEntry, ...] = (
    ModelEntry(
        id="realesrgan-x4plus",
        aliases=("real-esrgan",),
        description="Real-ESRGAN x4plus: general photo model (RRDBNet, 23 blocks)",
        default_scale=4,
        local=LocalSpec(weights={4: "realesrgan-x4plus"}),
        # fal.ai/models/fal-ai/esrgan/llms.txt: the scale is `scale` (1–8), the weights are picked by `model`.
        fal=FalRoute(
            app_id="fal-ai/esrgan",
            scale_field="scale",
            scale=ParamRange(1, 8),
            defaults={"model": "RealESRGAN_x4plus"},
        ),
        # fal bills esrgan per compute second; the gateway's card shows 0.2 cents an image.
        price=Price(per_image=0.002, source="lumenfall.ai/models real-esrgan card"),
        owned_by="xinntao",
    ),
    ModelEntry(
        id="realesrgan-x4plus-anime",
        description="Real-ESRGAN x4plus anime 6B: illustrations and anime",
        default_scale=4,
        local=LocalSpec(weights={4: "realesrgan-x4plus-anime"}),
        fal=FalRoute(
            app_id="fal-ai/esrgan",
            scale_field="scale",
            scale=ParamRange(1, 8),
            defaults={"model": "RealESRGAN_x4plus_anime_6B"},
        ),
        price=Price(per_image=0.002, source="lumenfall.ai/models real-esrgan card"),
        owned_by="xinntao",
    ),
    ModelEntry(
        id="realesr-animevideov3",
        description="Real-ESRGAN animevideov3 (SRVGGNetCompact): small and fast, native x2, x3 and x4",
        default_scale=4,
        local=LocalSpec(
            weights={2: "realesr-animevideov3-x2", 3: "realesr-animevideov3-x3", 4: "realesr-animevideov3-x4"},
        ),
        fal=FalRoute(
            app_id="fal-ai/esrgan",
            scale_field="scale",
            scale=ParamRange(1, 8),
            defaults={"model": "RealESRGAN_x4_anime_v3"},
        ),
        price=Price(per_image=0.002, source="lumenfall.ai/models real-esrgan card"),
        owned_by="xinntao",
    ),
    ModelEntry(
        id="aura-sr",
        description="AuraSR v2: GigaGAN 4x super-resolution for generated images",
        default_scale=4,
        local=LocalSpec(weights={4: "aura-sr"}),
        # fal-js endpoints.ts AuraSrInput: `upscaling_factor` is the constant "4" (so never sent), `checkpoint` v1|v2
        # (default v1; Loupe's local model is v2), `overlapping_tiles`. No fal price found.
        fal=FalRoute(app_id="fal-ai/aura-sr", scale_field=None, fixed_scale=4, defaults={"checkpoint": "v2"}),
        owned_by="fal",
    ),
    ModelEntry(
        id="topaz-image-upscale",
        description="Topaz: photo-realistic upscaling, fractional scales",
        default_scale=2,
        scale=ParamRange(1, 4),
        # fal.ai/models/fal-ai/topaz/upscale/image/llms.txt: `upscale_factor` 1–4, face and detail knobs 0–1,
        # `output_format` jpeg (default) | png. Its `prompt` only serves the Redefine model, which a client can't pick
        # (`model` is Loupe's own field), so no prompt is sent.
        fal=FalRoute(
            app_id="fal-ai/topaz/upscale/image",
            scale_field="upscale_factor",
            scale=ParamRange(1, 4),
            ranges={
                name: ParamRange(0, 1)
                for name in ("face_enhancement_strength", "face_enhancement_creativity", "denoise", "sharpen",
                             "fix_compression", "detail")
            },
            defaults={"output_format": "png"},
        ),
        # fal.ai/models/fal-ai/topaz/upscale/image pricing: by output megapixels.
        price=Price(
            tiers=((24, 0.08), (48, 0.16), (96, 0.32), (512, 1.36)),
            source="fal.ai/models/fal-ai/topaz/upscale/image",
        ),
        owned_by="topaz",
    ),
    ModelEntry(
        id="crystal-upscaler",
        description="Crystal (Clarity AI): portraits, faces and products, up to 10K",
        default_scale=2,
        scale=ParamRange(1, 200),
        # fal.ai/models/clarityai/crystal-upscaler/llms.txt: `scale_factor` 1–200, `creativity` 0–10; `{images: [...]}`.
        fal=FalRoute(
            app_id="clarityai/crystal-upscaler",
            scale_field="scale_factor",
            scale=ParamRange(1, 200),
            ranges={"creativity": ParamRange(0, 10)},
            output="images",
        ),
        # fal.ai/models/clarityai/crystal-upscaler: $0.016 per output megapixel.
        price=Price(per_megapixel=0.016, source="fal.ai/models/clarityai/crystal-upscaler"),
        owned_by="clarityai",
    ),
    ModelEntry(
        id="clarity-upscaler",
        description="Clarity: ControlNet-tile creative upscaler",
        default_scale=2,
        scale=ParamRange(1, 4),
        # fal.ai/models/fal-ai/clarity-upscaler/llms.txt: `upscale_factor` 1–4, `prompt`, `creativity` 0–1, `seed`;
        # `resemblance` 0–3 from the lumenfall.ai clarity-upscaler card.
        fal=FalRoute(
            app_id="fal-ai/clarity-upscaler",
            scale_field="upscale_factor",
            scale=ParamRange(1, 4),
            renamed={"prompt": "prompt", "seed": "seed"},
            ranges={"creativity": ParamRange(0, 1), "resemblance": ParamRange(0, 3)},
        ),
        # fal.ai/models/fal-ai/clarity-upscaler: $0.03 per megapixel.
        price=Price(per_megapixel=0.03, source="fal.ai/models/fal-ai/clarity-upscaler"),
        owned_by="philz1337x",
    ),
    ModelEntry(
        id="flux-vision-upscaler",
        description="Flux Vision: creative detail, structure preserved",
        default_scale=2,
        scale=ParamRange(1, 4),
        # fal.ai/models/fal-ai/flux-vision-upscaler/llms.txt: `upscale_factor` 1–4, `creativity` 0–1, `guidance` 1–4,
        # `steps` 4–50, `seed`. The common names guidance_scale and num_inference_steps are renamed to the app's.
        fal=FalRoute(
            app_id="fal-ai/flux-vision-upscaler",
            scale_field="upscale_factor",
            scale=ParamRange(1, 4),
            renamed={"seed": "seed", "guidance_scale": "guidance", "num_inference_steps": "steps"},
            ranges={"creativity": ParamRange(0, 1), "guidance": ParamRange(1, 4), "steps": ParamRange(4, 50)},
        ),
        # fal.ai/models/fal-ai/flux-vision-upscaler/llms.txt: $0.1 per megapixel (lumenfall shows "from $0.1/image").
        price=Price(per_megapixel=0.10, source="fal.ai/models/fal-ai/flux-vision-upscaler"),
        owned_by="fal",
    ),
    ModelEntry(
        id="seedvr-image-upscale",
        description="SeedVR2: high-fidelity photo upscaling",
        default_scale=2,
        scale=ParamRange(1, 10),
        # fal.ai/models/fal-ai/seedvr/upscale/image/llms.txt: `upscale_mode` factor|target, `upscale_factor` 1–10,
        # `seed`, `output_format` png | jpg (default) | webp.
        fal=FalRoute(
            app_id="fal-ai/seedvr/upscale/image",
            scale_field="upscale_factor",
            scale=ParamRange(1, 10),
            renamed={"seed": "seed"},
            defaults={"upscale_mode": "factor", "output_format": "png"},
        ),
        # fal.ai/models/fal-ai/seedvr/upscale/image: $0.001 per megapixel.
        price=Price(per_megapixel=0.001, source="fal.ai/models/fal-ai/seedvr/upscale/image"),
        owned_by="bytedance",
    ),
    ModelEntry(
        id="recraft-crisp-upscale",
        description="Recraft Crisp: sharp photographic detail, fixed scale",
        default_scale=4,
        # fal.ai/models/fal-ai/recraft/upscale/crisp: `image_url` "must be in PNG format"; no scale input.
        fal=FalRoute(app_id="fal-ai/recraft/upscale/crisp", scale_field=None, input_formats=("PNG",)),
        # recraft.ai/docs/api-reference/tools/upscale: $0.004 per image.
        price=Price(per_image=0.004, source="recraft.ai/docs/api-reference/tools/upscale"),
        owned_by="recraft",
    ),
    ModelEntry(
        id="recraft-creative-upscale",
        description="Recraft Creative: stylized and illustrated content, fixed scale",
        default_scale=4,
        fal=FalRoute(app_id="fal-ai/recraft/upscale/creative", scale_field=None, input_formats=("PNG",)),
        # recraft.ai/docs/api-reference/tools/upscale: $0.25 per image.
        price=Price(per_image=0.25, source="recraft.ai/docs/api-reference/tools/upscale"),
        owned_by="recraft",
    ),
    ModelEntry(
        id="google-upscaler",
        description="Google Imagen upscaler (Vertex), x2 or x4; reached through the gateway only",
        default_scale=2,
        scale=ParamRange(choices=(2, 4)),
        # lumenfall.ai/models google-upscaler card: 0.5 cents.
        price=Price(per_image=0.005, source="lumenfall.ai/models google-upscaler card"),
        owned_by="google",
    ),
)

_BY_NAME: dict[str, ModelEntry] = {name: entry for entry in MODELS for name in (entry.id, *entry.aliases)}
NAMES = frozenset(_BY_NAME)  # every id and alias: taken, for custom model files


def find(name: str) -> ModelEntry | None:
    """The row for a model id or alias, or None."""
    return _BY_NAME.get(name)
