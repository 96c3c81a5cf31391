"""The tile planner: every output pixel covered, weights that add up to one, equal tiles, odd sizes."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.engine.tiling import Plan, TilingSpec, plan_remaining, plan_tiles, split

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
def test_windows_share_one_shape_and_hold_their_core_with_its_context(width: int, height: int, scale: int, tile: int,
                                                                     spec: TilingSpec, fixed: bool) -> None:
    plan = plan_tiles((width, height), scale, tile, spec, fixed_window=fixed)
    window_w, window_h = plan.window
    assert window_w % spec.multiple_of == 0 and window_h % spec.multiple_of == 0
    assert min(plan.window) >= spec.minimum
    for t in plan.tiles:
        assert (t.window.width, t.window.height) == plan.window
        assert t.window.x0 == t.core.x0 - spec.context and t.window.y0 == t.core.y0 - spec.context
        assert t.window.x1 >= t.core.x1 + spec.context and t.window.y1 >= t.core.y1 + spec.context
        # Pasted pixels stay `context - blend` away from the window's edge: those saw too little of the image.
        margin = (spec.context - spec.blend) * scale
        assert t.paste.x0 >= t.window.x0 * scale + margin and t.paste.x1 <= t.window.x1 * scale - margin
        assert t.paste.y0 >= t.window.y0 * scale + margin and t.paste.y1 <= t.window.y1 * scale - margin
        rows, cols = plan.crop(t)
        assert 0 <= rows.start and rows.stop <= window_h * scale and 0 <= cols.start and cols.stop <= window_w * scale


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
def test_tiny_images_get_one_reflect_padded_window(size: tuple[int, int]) -> None:
    plan = plan_tiles(size, 4, 48, TilingSpec(context=16, blend=8))
    assert len(plan.tiles) == 1
    (tile,) = plan.tiles
    assert (tile.window.x0, tile.window.y0) == (-16, -16)
    assert plan.window == (size[0] + 32, size[1] + 32)
    assert (tile.paste.x0, tile.paste.y0, tile.paste.x1, tile.paste.y1) == (0, 0, size[0] * 4, size[1] * 4)
    assert (tile.weight_x == 1).all() and (tile.weight_y == 1).all()


def test_a_tile_at_least_as_large_as_the_image_and_full_frame_give_one_tile() -> None:
    assert len(plan_tiles((300, 200), 2, 300).tiles) == 1
    full = plan_tiles((300, 200), 2, 0)
    assert len(full.tiles) == 1 and full.window == (332, 232)


def test_fixed_windows_keep_one_shape_even_for_small_images() -> None:
    spec = TilingSpec(context=16, blend=8, multiple_of=8)
    assert plan_tiles((20, 30), 4, 512, spec, fixed_window=True).window == (544, 544)
    assert plan_tiles((2000, 30), 4, 512, spec, fixed_window=True).window == (544, 544)


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
    assert all((t.window.width, t.window.height) == last.window for t in last.tiles)

    sums = weight_sums(plan, range(failed)) + weight_sums(rest, range(again)) + weight_sums(last)
    assert (sums > 0.2).all()  # the executor divides by these: nothing left unweighted
