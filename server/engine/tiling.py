"""The tile planner: which input windows a model runs on, and how their outputs are blended.

Pure arithmetic on sizes (numpy for the blend ramps, no torch), so every property is unit-testable.

The image is cut into *cores*: a grid of equal-sized rectangles (sizes differ by at most one
pixel: 1200 px with 1024-px tiles makes two 600-px cores, not 1024 + 176). `fewest_tiles`
chooses the grid first, for the least work that fits a window budget; `plan_tiles` cuts it.
Each tile reads a *window*: its core grown by `context` pixels on every side that meets
another tile. At the image's own border a window stops, as the image does, so a border tile
sees what a full-frame pass sees there. Only to meet a size requirement (a multiple, a minimum)
do windows read past the border, reflected.

With `fixed_window`, for a compiled shape, every window is `tile + 2 * context` (rounded to the
size requirement): windows near the border slide inwards instead of shrinking, and read more of
the image. Along an axis shorter than that, the window is the whole axis.

A tile pastes its core grown by `blend` pixels on each side that has a neighbour, weighted by a
raised-sine ramp that crosses 0.5 on the core border. The outer `context - blend` pixels of every
window's inner sides, the ones that saw too little of the image, are never used. The executor
divides the sum of weighted tiles by the sum of weights, so tiles of different sizes (after an
out-of-memory re-plan) blend just as well as those of one grid.

A *grid* spec (AuraSR) plans otherwise: every window is exactly the model's native tile, laid on
a fixed grid from the top-left corner, without context. With `shifted_pass`, a second grid offset
by half a tile runs too, and both blend with centre-weighted ramps: along each axis the two ramps
add up to 1, so every output pixel leans on whichever window sees it farther from its border.

Plans are in processing order, row by row, and tell after each tile which output rows can no
longer change (`flush_after`), so the executor keeps only a band of rows in float.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class TilingSpec:
    """How a family wants tiling: cores grown by context (Real-ESRGAN), or a grid of native tiles (AuraSR)."""

    context: int = 16  # input pixels each window reads beyond its core, on every side
    blend: int = 8  # input pixels on either side of a core border over which neighbours cross-fade
    multiple_of: int = 1  # window sides must be a multiple of this (the model's size requirement)
    minimum: int = 0  # window sides must be at least this
    grid: int = 0  # > 0: windows of exactly this side on a fixed grid; context, blend and the tile size are unused
    shifted_pass: bool = False  # grid only: a second grid, offset by half a tile, blended in

    def __post_init__(self) -> None:
        if not 0 <= self.blend <= self.context:
            raise ValueError(f"blend ({self.blend}) must lie between 0 and context ({self.context})")
        if self.multiple_of < 1 or self.minimum < 0:
            raise ValueError("multiple_of must be at least 1 and minimum at least 0")
        if self.grid and (self.grid % self.multiple_of or self.grid < self.minimum or self.grid % 2):
            raise ValueError(f"a {self.grid}-px grid is odd or breaks the size requirement "
                             f"(a multiple of {self.multiple_of}, at least {self.minimum})")


@dataclass(frozen=True)
class Box:
    """A rectangle [x0, x1) × [y0, y1) in pixels."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def empty(self) -> bool:
        return self.x1 <= self.x0 or self.y1 <= self.y0


@dataclass(frozen=True, eq=False)
class Tile:
    core: Box  # input pixels this tile answers for
    window: Box  # input pixels it reads; may extend past the image (read reflected)
    paste: Box  # output pixels it contributes to
    weight_x: np.ndarray  # float32, paste.width: the blend weight of each output column
    weight_y: np.ndarray  # float32, paste.height
    region: int  # index into Plan.regions


@dataclass(frozen=True, eq=False)
class Plan:
    size: tuple[int, int]  # image width, height
    scale: int
    tile: int  # the largest core side of this plan
    spec: TilingSpec
    fixed_window: bool
    regions: tuple[Box, ...]  # areas cut into grids of cores, in processing order
    window: tuple[int, int]  # width, height of the largest window (of every window, when fixed)
    tiles: tuple[Tile, ...]  # in processing order: region by region, row by row
    flush_after: tuple[int, ...]  # output rows that are final once tiles[: i + 1] are done

    @property
    def output_size(self) -> tuple[int, int]:
        return self.size[0] * self.scale, self.size[1] * self.scale

    @property
    def first_open_row(self) -> int:
        """Output rows above this get nothing from this plan."""
        return min((t.paste.y0 for t in self.tiles), default=self.output_size[1])

    @property
    def window_pixels(self) -> int:
        """Input pixels the model runs on, context included: what the work costs."""
        return sum(t.window.width * t.window.height for t in self.tiles)

    def crop(self, tile: Tile) -> tuple[slice, slice]:
        """(rows, columns) of the window's output that `tile` pastes."""
        x0 = tile.paste.x0 - tile.window.x0 * self.scale
        y0 = tile.paste.y0 - tile.window.y0 * self.scale
        return slice(y0, y0 + tile.paste.height), slice(x0, x0 + tile.paste.width)


def plan_tiles(
    size: tuple[int, int], scale: int, tile: int | tuple[int, int], spec: TilingSpec = TilingSpec(), *,
    fixed_window: bool = False,
) -> Plan:
    """Plan a whole image. `tile` is the largest core side, or (columns, rows) of cores; 0 is one full-frame tile.

    `fixed_window` makes every window `tile + 2 * context` (rounded to the size requirement) along
    each axis at least that long, so that a compiled model always sees its shape. A grid spec
    ignores both: its windows are always its grid side.
    """
    width, height = size
    if isinstance(tile, tuple):
        counts, fixed = tile, None
    elif tile > 0:
        counts, fixed = (math.ceil(width / tile), math.ceil(height / tile)), tile if fixed_window else None
    else:
        counts, fixed = (1, 1), None
    if width < 1 or height < 1 or scale < 1 or min(counts) < 1 or (isinstance(tile, int) and tile < 0):
        raise ValueError(f"can't plan {width}x{height} at x{scale} with tiles {tile}")
    if spec.grid:
        return _plan_grid(size, scale, spec)
    cuts = [(Box(0, 0, width, height), _borders(width, counts[0]), _borders(height, counts[1]))]
    return _plan_regions(size, scale, spec, fixed, cuts)


def fewest_tiles(size: tuple[int, int], spec: TilingSpec, fits: Callable[[int, int], bool]) -> tuple[int, int]:
    """(columns, rows) of cores that run the least window pixels in all, each window (width, height) one that `fits`.

    For each column count it takes the fewest rows that fit: the least work, except where rounding
    windows up to a size requirement's multiple makes one more row a little cheaper.

    `fits` must hold for any window no larger than one that fits. One full frame when it fits; when
    even 16-px cores don't fit, the grid of 16-px cores (the executor's out-of-memory recovery takes over).
    """
    width, height = size
    most_x, most_y = (max(1, math.ceil(side / _SMALLEST_CORE)) for side in size)
    best: tuple[int, int, int] | None = None  # window pixels in all, tiles, columns
    best_rows = most_y
    for columns in range(1, most_x + 1):
        largest_x, total_x = _axis_extent(width, columns, spec)
        if best is not None and total_x * height > best[0]:
            break  # every window covers at least the image's rows: more columns only cost more
        rows = _fewest_rows(height, spec, most_y, lambda extent: fits(largest_x, extent))
        if rows is None:
            continue
        _, total_y = _axis_extent(height, rows, spec)
        candidate = (total_x * total_y, columns * rows, columns)
        if best is None or candidate < best:
            best, best_rows = candidate, rows
    if best is None:
        return most_x, most_y
    return best[2], best_rows


def plan_remaining(plan: Plan, failed: int, tile: int) -> Plan:
    """Re-plan, with `tile`-px cores, what is left when `plan.tiles[failed]` could not run.

    The tiles before it are done and stay as they are. The rest of its row is cut again, then
    the rest of its region, then the regions after it; the new tiles blend into the done ones
    along the shared borders.
    """
    if not 0 <= failed < len(plan.tiles) or tile < 1:
        raise ValueError(f"no tile {failed} to resume from, or a bad tile size {tile}")
    if plan.spec.grid:
        raise ValueError("a grid plan is never cut again: its windows are the model's native tile")
    core, index = plan.tiles[failed].core, plan.tiles[failed].region
    region = plan.regions[index]
    regions = [
        Box(core.x0, core.y0, region.x1, core.y1),
        Box(region.x0, core.y1, region.x1, region.y1),
        *plan.regions[index + 1 :],
    ]
    cuts = [(r, split(r.width, tile), split(r.height, tile)) for r in regions if not r.empty]
    return _plan_regions(plan.size, plan.scale, plan.spec, tile if plan.fixed_window else None, cuts)


def split(length: int, tile: int) -> list[int]:
    """Core borders along one side: ceil(length / tile) parts of equal size (±1), as offsets from 0 to length."""
    return _borders(length, math.ceil(length / tile))


def window_side(core: int, spec: TilingSpec) -> int:
    """The window side that holds a `core`-px core with its context on both sides, rounded to the size requirement."""
    return _required(core + 2 * spec.context, spec)


_SMALLEST_CORE = 16  # cores below this cost more in context than they save in memory


def _borders(length: int, count: int) -> list[int]:
    count = max(1, min(count, length))
    return [length * i // count for i in range(count + 1)]


def _required(side: int, spec: TilingSpec) -> int:
    side = max(side, spec.minimum)
    return -(-side // spec.multiple_of) * spec.multiple_of


def _axis_extent(length: int, count: int, spec: TilingSpec) -> tuple[int, int]:
    """(largest, total) window extent of `count` cores along an axis `length` long."""
    borders = _borders(length, count)
    extents = [hi - lo for lo, hi in (_window_span(a, b, length, spec, None) for a, b in zip(borders, borders[1:]))]
    return max(extents), sum(extents)


def _fewest_rows(height: int, spec: TilingSpec, most: int, fits: Callable[[int], bool]) -> int | None:
    """The fewest rows, up to `most`, whose tallest window `fits`; None if none does."""
    if not fits(_axis_extent(height, most, spec)[0]):
        return None
    least = 1
    while least < most:  # the tallest window never grows with more rows
        middle = (least + most) // 2
        if fits(_axis_extent(height, middle, spec)[0]):
            most = middle
        else:
            least = middle + 1
    return least


def _window_span(start: int, end: int, length: int, spec: TilingSpec, fixed: int | None) -> tuple[int, int]:
    """The input span [lo, hi) a core [start, end) reads along an axis `length` long.

    Context where the core meets another core, none past the image; a fixed span slides inwards.
    Only a size requirement the image itself can't meet reads past its border.
    """
    if fixed is not None and fixed <= length:
        lo = min(max(start - spec.context, 0), length - fixed)
        return lo, lo + fixed
    lo = max(start - spec.context, 0)
    hi = min(end + spec.context, length)
    missing = _required(hi - lo, spec) - (hi - lo)
    grown = min(missing, length - hi)  # into the image first, after the core
    hi += grown
    earlier = min(missing - grown, lo)  # then before it
    lo -= earlier
    return lo, hi + missing - grown - earlier  # the rest past the border, read reflected


def _plan_regions(size: tuple[int, int], scale: int, spec: TilingSpec, fixed_tile: int | None,
                  cuts: list[tuple[Box, list[int], list[int]]]) -> Plan:
    """Tiles for each (region, column borders, row borders); windows of `fixed_tile`'s side when it is set."""
    largest_core = max(b - a for _, xs, ys in cuts for borders in (xs, ys) for a, b in zip(borders, borders[1:]))
    fixed = None if fixed_tile is None else window_side(fixed_tile, spec)
    tiles: list[Tile] = []
    for index, (region, xs, ys) in enumerate(cuts):
        # One blend width per grid axis, so that neighbouring ramps mirror each other exactly.
        half_x, half_y = (min(spec.blend, min(b - a for a, b in zip(borders, borders[1:])) // 2)
                          for borders in (xs, ys))
        for top, bottom in zip(ys, ys[1:]):
            core_y0, core_y1 = region.y0 + top, region.y0 + bottom
            y0, y1, weight_y = _axis(core_y0, core_y1, size[1], scale, half_y)
            reads_y = _window_span(core_y0, core_y1, size[1], spec, fixed)
            for left, right in zip(xs, xs[1:]):
                core_x0, core_x1 = region.x0 + left, region.x0 + right
                x0, x1, weight_x = _axis(core_x0, core_x1, size[0], scale, half_x)
                reads_x = _window_span(core_x0, core_x1, size[0], spec, fixed)
                core = Box(core_x0, core_y0, core_x1, core_y1)
                reads = Box(reads_x[0], reads_y[0], reads_x[1], reads_y[1])
                tiles.append(Tile(core, reads, Box(x0, y0, x1, y1), weight_x, weight_y, index))
    window = (max(t.window.width for t in tiles), max(t.window.height for t in tiles))
    open_rows = _suffix_min([t.paste.y0 for t in tiles] + [size[1] * scale])
    regions = tuple(region for region, _, _ in cuts)
    return Plan(size, scale, fixed_tile or largest_core, spec, fixed_tile is not None, regions, window, tuple(tiles),
                tuple(open_rows[1:]))


def _plan_grid(size: tuple[int, int], scale: int, spec: TilingSpec) -> Plan:
    width, height = size
    side = spec.grid
    offsets = (0, side // 2) if spec.shifted_pass else (0,)
    corners = sorted({(y, x) for offset in offsets for y in range(-offset, height, side)
                      for x in range(-offset, width, side)})
    tiles: list[Tile] = []
    for y, x in corners:
        window = Box(x, y, x + side, y + side)
        core = Box(max(x, 0), max(y, 0), min(x + side, width), min(y + side, height))
        paste = Box(core.x0 * scale, core.y0 * scale, core.x1 * scale, core.y1 * scale)
        weight_x, weight_y = (
            _grid_weights(side * scale, (start - origin) * scale, (stop - origin) * scale, spec.shifted_pass)
            for start, stop, origin in ((core.x0, core.x1, x), (core.y0, core.y1, y))
        )
        tiles.append(Tile(core, window, paste, weight_x, weight_y, 0))
    open_rows = _suffix_min([t.paste.y0 for t in tiles] + [height * scale])
    return Plan(size, scale, side, spec, True, (Box(0, 0, width, height),), (side, side), tuple(tiles),
                tuple(open_rows[1:]))


@lru_cache(maxsize=256)
def _grid_weights(length: int, start: int, stop: int, centred: bool) -> np.ndarray:
    """Weights [start, stop) of a grid window's output `length` long: flat, or sin² peaking at its centre.

    Shifted by half a window the centred ramp turns into cos², so the two grids' ramps add up to 1.
    """
    if centred:
        t = (np.arange(start, stop, dtype=np.float64) + 0.5) / length
        weights = (np.sin(t * np.pi) ** 2).astype(np.float32)
    else:
        weights = np.ones(stop - start, dtype=np.float32)
    weights.flags.writeable = False
    return weights


def _suffix_min(values: list[int]) -> list[int]:
    result = values[:]
    for i in range(len(result) - 2, -1, -1):
        result[i] = min(result[i], result[i + 1])
    return result


def _axis(start: int, end: int, length: int, scale: int, half: int) -> tuple[int, int, np.ndarray]:
    """Output span and weights of a core [start, end) along one axis of an image `length` long."""
    lead = half if start > 0 else 0
    trail = half if end < length else 0
    weights = _weights((end - start) * scale, lead * scale, trail * scale)
    return (start - lead) * scale, (end + trail) * scale, weights


@lru_cache(maxsize=1024)
def _weights(core: int, lead: int, trail: int) -> np.ndarray:
    """1 over the core, with raised-sine ramps 2*lead wide across its start and 2*trail across its end."""
    weights = np.ones(core + lead + trail, dtype=np.float32)
    if lead:
        weights[: 2 * lead] = _ramp(2 * lead)
    if trail:
        weights[len(weights) - 2 * trail :] = _ramp(2 * trail)[::-1]
    weights.flags.writeable = False
    return weights


def _ramp(length: int) -> np.ndarray:
    # sin² of pixel centres: a neighbour's mirrored ramp adds up to exactly 1, and no weight is 0.
    t = (np.arange(length, dtype=np.float64) + 0.5) / length
    return np.sin(t * (np.pi / 2)) ** 2
