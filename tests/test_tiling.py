"""The tile planner: every output pixel covered, weights that add up to one, equal tiles, odd sizes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.tiling import Plan, TilingSpec, fewest_tiles, plan_remaining, plan_tiles, split, window_side

sizes = st.integers(1, 90)
specs = st.builds(
    lambda context, blend_share, multiple_of, minimum: TilingSpec(context, context * blend_share // 4, multiple_of,
                                                                   minimum),
    st.integers(0, 12), st.integers(0, 4), st.sampled_from([1, 2, 8]), st.sampled_from([0, 16]),
)


def weight_sums(plan: Plan, tiles: range | None = None) -> np.ndarray:
    """Σ of the tiles' weights at every output pixel."""
    width, height = plan.output_size
    sums = np.zeros((height, width))
    for i in tiles if tiles is not None else range(len(plan.tiles)):
        t = plan.tiles[i]
        sums[t.paste.y0 : t.paste.y1, t.paste.x0 : t.paste.x1] += np.outer(t.weight_y, t.weight_x)
    return sums


def core_cover(plan: Plan) -> np.ndarray:
    counts = np.zeros(plan.size[::-1], dtype=int)
    for t in plan.tiles:
        counts[t.core.y0 : t.core.y1, t.core.x0 : t.core.x1] += 1
    return counts


@settings(max_examples=100, deadline=None)
@given(width=sizes, height=sizes, scale=st.integers(1, 4), tile=st.integers(1, 64), spec=specs)
def test_blend_weights_cover_every_output_pixel_and_add_up_to_one(width: int, height: int, scale: int, tile: int,
                                                                  spec: TilingSpec) -> None:
    plan = plan_tiles((width, height), scale, tile, spec)
    assert (core_cover(plan) == 1).all()
    np.testing.assert_allclose(weight_sums(plan), 1.0, atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(width=sizes, height=sizes, scale=st.integers(1, 4), tile=st.integers(1, 64), spec=specs,
       fixed=st.booleans())
def test_windows_hold_their_core_with_context_toward_other_tiles_and_stop_at_the_image_border(
        width: int, height: int, scale: int, tile: int, spec: TilingSpec, fixed: bool) -> None:
    plan = plan_tiles((width, height), scale, tile, spec, fixed_window=fixed)
    fixed_side = window_side(tile, spec)
    for t in plan.tiles:
        for lo, hi, core_lo, core_hi, length in ((t.window.x0, t.window.x1, t.core.x0, t.core.x1, width),
                                                 (t.window.y0, t.window.y1, t.core.y0, t.core.y1, height)):
            assert (hi - lo) % spec.multiple_of == 0 and hi - lo >= spec.minimum
            assert lo <= max(core_lo - spec.context, 0) and hi >= min(core_hi + spec.context, length)
            # Past the border only where the image itself is shorter than the size requirement.
            assert (0 <= lo and hi <= length) or hi - lo > length
            if fixed and length >= fixed_side:
                assert hi - lo == fixed_side
        # Pasted pixels stay `context - blend` away from an inner window edge: those saw too little of the image.
        margin = (spec.context - spec.blend) * scale
        assert t.paste.x0 >= t.window.x0 * scale + (margin if t.window.x0 > 0 else 0)
        assert t.paste.x1 <= t.window.x1 * scale - (margin if t.window.x1 < width else 0)
        assert t.paste.y0 >= t.window.y0 * scale + (margin if t.window.y0 > 0 else 0)
        assert t.paste.y1 <= t.window.y1 * scale - (margin if t.window.y1 < height else 0)
        rows, cols = plan.crop(t)
        assert 0 <= rows.start and rows.stop <= t.window.height * scale
        assert 0 <= cols.start and cols.stop <= t.window.width * scale
    assert plan.window == (max(t.window.width for t in plan.tiles), max(t.window.height for t in plan.tiles))


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 160), height=st.integers(1, 160), spec=specs, budget=st.integers(1, 40_000))
def test_the_fewest_tiles_are_the_least_work_that_fits_the_budget(width: int, height: int, spec: TilingSpec,
                                                                   budget: int) -> None:
    def work(columns: int, rows: int) -> tuple[int, int]:
        plan = plan_tiles((width, height), 1, (columns, rows), spec)
        return plan.window_pixels, plan.window[0] * plan.window[1]

    columns, rows = fewest_tiles((width, height), spec, lambda w, h: w * h <= budget)
    grids = [(c, r) for c in range(1, math.ceil(width / 16) + 1) for r in range(1, math.ceil(height / 16) + 1)
             if work(c, r)[1] <= budget]
    if not grids:
        assert (columns, rows) == (math.ceil(width / 16), math.ceil(height / 16))
        return
    assert work(columns, rows)[1] <= budget
    least = min(work(c, r)[0] for c, r in grids)
    if spec.multiple_of == 1:
        assert work(columns, rows)[0] == least
    else:  # rounding windows up to the multiple can make one more row cheaper; the planner takes the fewest
        assert work(columns, rows)[0] <= 1.25 * least


def test_an_image_that_fits_runs_as_one_full_frame() -> None:
    spec = TilingSpec(context=32, blend=16)
    assert fewest_tiles((450, 300), spec, lambda w, h: w * h <= 450 * 300) == (1, 1)
    # Just too little for the full frame: two tiles side by side, not four, and context only where they meet.
    columns, rows = fewest_tiles((450, 300), spec, lambda w, h: w * h < 450 * 300)
    assert (columns, rows) == (2, 1)
    plan = plan_tiles((450, 300), 4, (columns, rows), spec)
    assert [(t.window.x0, t.window.x1) for t in plan.tiles] == [(0, 257), (193, 450)]
    assert all((t.window.y0, t.window.y1) == (0, 300) for t in plan.tiles)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(1, 5000), tile=st.integers(1, 1024))
def test_tiles_are_equalized(length: int, tile: int) -> None:
    borders = split(length, tile)
    parts = [b - a for a, b in zip(borders, borders[1:])]
    assert borders[0] == 0 and borders[-1] == length
    assert len(parts) == math.ceil(length / tile)
    assert max(parts) <= tile and max(parts) - min(parts) <= 1


def test_1200_pixels_with_1024_pixel_tiles_make_two_600_pixel_tiles() -> None:
    plan = plan_tiles((1200, 500), 4, 1024)
    assert [(t.core.x0, t.core.x1) for t in plan.tiles] == [(0, 600), (600, 1200)]


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (3, 2)])
def test_tiny_images_run_as_they_are(size: tuple[int, int]) -> None:
    plan = plan_tiles(size, 4, 48, TilingSpec(context=16, blend=8))
    (tile,) = plan.tiles
    assert (tile.window.x0, tile.window.y0, tile.window.x1, tile.window.y1) == (0, 0, *size)
    assert (tile.paste.x0, tile.paste.y0, tile.paste.x1, tile.paste.y1) == (0, 0, size[0] * 4, size[1] * 4)
    assert (tile.weight_x == 1).all() and (tile.weight_y == 1).all()


def test_a_size_requirement_the_image_cannot_meet_reads_past_its_far_border() -> None:
    (tile,) = plan_tiles((5, 3), 4, 0, TilingSpec(context=16, blend=8, multiple_of=8, minimum=16)).tiles
    assert (tile.window.x0, tile.window.y0, tile.window.x1, tile.window.y1) == (0, 0, 16, 16)


def test_a_tile_at_least_as_large_as_the_image_and_full_frame_give_one_tile() -> None:
    assert len(plan_tiles((300, 200), 2, 300).tiles) == 1
    full = plan_tiles((300, 200), 2, 0)
    assert len(full.tiles) == 1 and full.window == (300, 200)


def test_fixed_windows_slide_inwards_at_the_border_and_keep_one_shape() -> None:
    spec = TilingSpec(context=16, blend=8, multiple_of=8)
    wide = plan_tiles((2000, 30), 4, 512, spec, fixed_window=True)
    assert {(t.window.width, t.window.height) for t in wide.tiles} == {(544, 32)}
    assert wide.tiles[0].window.x0 == 0 and wide.tiles[-1].window.x1 == 2000
    assert plan_tiles((20, 30), 4, 512, spec, fixed_window=True).window == (24, 32)  # shorter than one window


@settings(max_examples=100, deadline=None)
@given(width=sizes, height=sizes, scale=st.integers(1, 3), tile=st.integers(2, 40), spec=specs)
def test_rows_are_final_once_no_later_tile_reaches_them(width: int, height: int, scale: int, tile: int,
                                                        spec: TilingSpec) -> None:
    plan = plan_tiles((width, height), scale, tile, spec)
    assert list(plan.flush_after) == sorted(plan.flush_after)
    assert plan.flush_after[-1] == height * scale
    for i, final in enumerate(plan.flush_after[:-1]):
        assert all(later.paste.y0 >= final for later in plan.tiles[i + 1 :])


@settings(max_examples=100, deadline=None)
@given(width=sizes, height=sizes, scale=st.integers(1, 3), tile=st.integers(2, 40), spec=specs, data=st.data())
def test_resuming_after_a_failed_tile_covers_exactly_what_was_left(width: int, height: int, scale: int, tile: int,
                                                                  spec: TilingSpec, data: st.DataObject) -> None:
    plan = plan_tiles((width, height), scale, tile, spec)
    failed = data.draw(st.integers(0, len(plan.tiles) - 1))
    smaller = data.draw(st.integers(1, max(1, tile // 2)))
    rest = plan_remaining(plan, failed, smaller)
    # Again after a second failure inside the re-plan, as a second out-of-memory would.
    again = data.draw(st.integers(0, len(rest.tiles) - 1))
    last = plan_remaining(rest, again, max(1, smaller // 2))

    cover = np.zeros((height, width), dtype=int)
    for t in (*plan.tiles[:failed], *rest.tiles[:again], *last.tiles):
        cover[t.core.y0 : t.core.y1, t.core.x0 : t.core.x1] += 1
    assert (cover == 1).all()
    assert all(max(t.core.width, t.core.height) <= max(1, smaller // 2) for t in last.tiles)

    sums = weight_sums(plan, range(failed)) + weight_sums(rest, range(again)) + weight_sums(last)
    assert (sums > 0.2).all()  # the executor divides by these: nothing left unweighted
