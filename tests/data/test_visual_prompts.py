"""Visual prompts: each marker kind draws where, and how, it is asked to; goldens; errors; phrases."""
import dataclasses
import warnings

import numpy as np
import PIL
import pytest
from PIL import Image

from vipllava_jax.data import visual_prompts as vp
from vipllava_jax.data import ImageConfig, preprocess_image

from make_visual_prompt_goldens import OUT as GOLDENS, PILLOW_VERSION, canvas, golden_markers

W, H = 200, 120
GREY = (128, 128, 128)


def grey():
    return Image.new("RGB", (W, H), GREY)


def disk_mask(cx=100, cy=60, r=30):
    y, x = np.mgrid[0:H, 0:W]
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r


# one marker per kind, with the region (x0, y0, x1, y1) it must stay near
CASES = {
    "rectangle": (lambda **s: vp.Rectangle((50, 30, 150, 90), **s), (50, 30, 150, 90)),
    "ellipse": (lambda **s: vp.Ellipse((50, 30, 150, 90), **s), (50, 30, 150, 90)),
    "triangle": (lambda **s: vp.Triangle(box=(50, 30, 150, 90), seed=3, **s), (50, 30, 150, 90)),
    "point": (lambda **s: vp.Point((100, 60), radius=8, **s), (92, 52, 108, 68)),
    "arrow": (lambda **s: vp.Arrow((60, 100), (140, 40), **s), (60, 40, 140, 100)),
    "scribble": (lambda **s: vp.Scribble(box=(50, 30, 150, 90), seed=4, **s), (50, 30, 150, 90)),
    "mask_contour": (lambda **s: vp.MaskContour(disk_mask(), **s), (70, 30, 131, 91)),
    "mask": (lambda **s: vp.Mask(disk_mask(), **s), (70, 30, 131, 91)),
}


def changed(a, b=None):
    b = np.asarray(grey()) if b is None else np.asarray(b)
    return np.any(np.asarray(a).astype(int) != np.asarray(b).astype(int), axis=-1)


@pytest.mark.parametrize("kind", vp.MARKER_KINDS)
def test_pixels_change_inside_the_region_only(kind):
    make, (x0, y0, x1, y1) = CASES[kind]
    m = make(width=3) if kind != "point" and kind != "mask" else make()
    out = vp.draw_markers(grey(), [m], warn_crop=False)
    ch = changed(out)
    assert ch[y0:y1, x0:x1].sum() > 20  # something drawn inside
    pad = 2 * 3 + 1  # nothing further than twice the line width from the region
    outside = ch.copy()
    outside[max(0, y0 - pad):y1 + pad, max(0, x0 - pad):x1 + pad] = False
    assert not outside.any(), np.argwhere(outside)[:5]
    assert vp.marker_extent(m, (W, H)) is not None


@pytest.mark.parametrize("kind", vp.MARKER_KINDS)
def test_colour_and_alpha(kind):
    make, _ = CASES[kind]
    opaque = np.asarray(vp.draw_markers(grey(), [make(color="blue", alpha=1.0)], warn_crop=False))
    px = opaque[changed(opaque)]
    assert (px == (0, 0, 255)).all()  # no antialiasing: every marker pixel is exactly the colour
    half = np.asarray(vp.draw_markers(grey(), [make(color=(200, 40, 10), alpha=0.5)], warn_crop=False))
    ch = changed(half)
    np.testing.assert_array_equal(ch, changed(opaque))  # same pixels, blended
    want = np.rint(0.5 * np.array(GREY) + 0.5 * np.array((200, 40, 10)))
    assert np.abs(half[ch].astype(int) - want).max() <= 1


def test_opaque_red_rectangle_stroke_is_exact_and_interior_untouched():
    out = np.asarray(vp.draw_rectangle(grey(), (50, 30, 150, 90), width=4, warn_crop=False))
    assert tuple(out[30, 100]) == (255, 0, 0) and tuple(out[33, 100]) == (255, 0, 0)
    assert tuple(out[34, 100]) == GREY and tuple(out[60, 100]) == GREY


@pytest.mark.parametrize("kind", ["triangle", "scribble"])
def test_seeded_shapes_are_deterministic(kind):
    box = (50, 30, 150, 90)
    cls = vp.Triangle if kind == "triangle" else vp.Scribble
    a = np.asarray(vp.draw_markers(grey(), [cls(box=box, seed=11)], warn_crop=False))
    b = np.asarray(vp.draw_markers(grey(), [cls(box=box, seed=11)], warn_crop=False))
    c = np.asarray(vp.draw_markers(grey(), [cls(box=box, seed=12)], warn_crop=False))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_triangle_from_box_has_no_angle_over_150():
    for seed in range(20):
        pts = vp._triangle_points(vp.Triangle(box=(0, 0, 100, 10), seed=seed), (W, H))
        assert vp._max_angle(pts) < 150


@pytest.mark.parametrize("kind", ["rectangle", "ellipse", "triangle", "point", "arrow", "scribble"])
def test_normalized_and_pixel_coordinates_agree(kind):
    f = np.array([W, H, W, H], float)
    px = {"rectangle": vp.Rectangle((50, 30, 150, 90)), "ellipse": vp.Ellipse((50, 30, 150, 90)),
          "triangle": vp.Triangle(points=((50, 90), (100, 30), (150, 90))), "point": vp.Point((100, 60)),
          "arrow": vp.Arrow((60, 100), (140, 40)), "scribble": vp.Scribble(points=((50, 30), (90, 80), (150, 60)))}
    nz = {"rectangle": vp.Rectangle(tuple(np.array([50, 30, 150, 90]) / f), normalized=True),
          "ellipse": vp.Ellipse(tuple(np.array([50, 30, 150, 90]) / f), normalized=True),
          "triangle": vp.Triangle(points=((50 / W, 90 / H), (100 / W, 30 / H), (150 / W, 90 / H)), normalized=True),
          "point": vp.Point((100 / W, 60 / H), normalized=True),
          "arrow": vp.Arrow((60 / W, 100 / H), (140 / W, 40 / H), normalized=True),
          "scribble": vp.Scribble(points=((50 / W, 30 / H), (90 / W, 80 / H), (150 / W, 60 / H)), normalized=True)}
    np.testing.assert_array_equal(np.asarray(vp.draw_markers(grey(), [px[kind]], warn_crop=False)),
                                  np.asarray(vp.draw_markers(grey(), [nz[kind]], warn_crop=False)))


def test_several_markers_each_with_its_colour_and_input_untouched():
    img = grey()
    before = np.asarray(img).copy()
    arr_in = np.asarray(grey()).copy()
    ms = [vp.Rectangle((10, 10, 60, 50), color="red"), vp.Arrow((190, 110), (120, 70), color="blue"),
          vp.Point((100, 100), radius=5, color="lime")]
    out = np.asarray(vp.draw_markers(img, ms, warn_crop=False))
    np.testing.assert_array_equal(np.asarray(img), before)
    colours = {tuple(c) for c in out[changed(out)]}
    assert colours == {(255, 0, 0), (0, 0, 255), (0, 255, 0)}
    assert (changed(out)[:, :70] == changed(vp.draw_markers(grey(), ms[:1], warn_crop=False))[:, :70]).all()
    out2 = vp.draw_markers(arr_in, ms, warn_crop=False)  # numpy input
    np.testing.assert_array_equal(np.asarray(out2), out)
    np.testing.assert_array_equal(arr_in, before)


def test_later_markers_draw_on_top():
    a = vp.Rectangle((40, 20, 160, 100), color="red", width=6)
    b = vp.Rectangle((40, 20, 160, 100), color="blue", width=6)
    out = np.asarray(vp.draw_markers(grey(), [a, b], warn_crop=False))
    assert tuple(out[20, 100]) == (0, 0, 255)


def test_crop_warning_and_pad_to_square():
    # 200x120: the centre crop keeps x 40..160
    with pytest.warns(UserWarning, match="rectangle marker .* beyond the centre square"):
        vp.draw_markers(grey(), [vp.Rectangle((2, 10, 30, 50))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vp.draw_markers(grey(), [vp.Rectangle((60, 10, 140, 100))])  # inside: no warning
        out = vp.draw_markers(grey(), [vp.Rectangle((2, 10, 30, 50))], pad_to_square=True)  # padded: no crop
    assert out.size == (200, 200)
    a = np.asarray(out)
    mean = tuple(int(c * 255) for c in (0.48145466, 0.4578275, 0.40821073))
    assert tuple(a[0, 100]) == mean and tuple(a[199, 100]) == mean
    assert tuple(a[40 + 10, 2]) == (255, 0, 0)  # the marker moved down with the image (40 px of padding)


def test_default_width_scales_with_image_size():
    small = vp.draw_rectangle(Image.new("RGB", (336, 336)), (100, 100, 200, 200))
    big = vp.draw_rectangle(Image.new("RGB", (1344, 1344)), (400, 400, 800, 800))
    assert changed(small, Image.new("RGB", (336, 336)))[150, 95:110].sum() == 3
    assert changed(big, Image.new("RGB", (1344, 1344)))[600, 390:420].sum() == 12


@pytest.mark.parametrize("kind", vp.MARKER_KINDS)
def test_goldens(kind):
    """Against goldens made by tests/data/make_visual_prompt_goldens.py and reviewed by eye: every pixel within 1
    with the Pillow that drew them; with another Pillow (whose line / ellipse rasterisation may differ by a
    pixel here and there) at most 1% of the pixels may differ."""
    golden = np.asarray(Image.open(GOLDENS / f"{kind}.png").convert("RGB")).astype(int)
    out = np.asarray(vp.draw_markers(canvas(), [golden_markers()[kind]], warn_crop=False)).astype(int)
    bad = np.abs(out - golden).max(axis=-1) > 1
    hint = (f"{kind}: {bad.sum()} pixels differ from {GOLDENS / kind}.png (Pillow {PIL.__version__}, goldens made "
            f"with {PILLOW_VERSION}); if the drawing is right, run tests/data/make_visual_prompt_goldens.py and review")
    if PIL.__version__ == PILLOW_VERSION:
        assert not bad.any(), hint
    else:
        assert bad.mean() <= 0.01, hint


# --- errors ------------------------------------------------------------------------------------------------------
def test_mask_with_the_wrong_shape():
    with pytest.raises(ValueError, match=r"mask shape \(60, 100\) does not match the image's \(height, width\) "
                                         r"\(120, 200\)"):
        vp.draw_markers(grey(), [vp.Mask(np.ones((60, 100), bool))])


def test_box_outside_the_image():
    with pytest.raises(ValueError, match=r"rectangle: box .* is outside the 200x120 image"):
        vp.draw_markers(grey(), [vp.Rectangle((150, 30, 250, 90))])
    with pytest.raises(ValueError, match="x1 > x0"):
        vp.draw_markers(grey(), [vp.Ellipse((150, 30, 50, 90))])
    with pytest.raises(ValueError, match=r"normalized box .* must lie in \[0, 1\]"):
        vp.draw_markers(grey(), [vp.Rectangle((0.1, 0.1, 1.5, 0.5), normalized=True)])
    with pytest.raises(ValueError, match=r"arrow: head .* is outside"):
        vp.draw_markers(grey(), [vp.Arrow((10, 10), (300, 10))])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_nan_and_infinite_coordinates_are_refused(bad):
    """NaN and infinity alike, in pixel and normalized coordinates of every coordinate-taking kind, and in
    polygons (records.polygon_mask, which Pillow would otherwise fill far too big)."""
    from vipllava_jax.data.records import polygon_mask
    markers = [vp.Rectangle((50, bad, 150, 90)), vp.Ellipse((50, 30, bad, 90)), vp.Point((bad, 60)),
               vp.Arrow((60, 100), (bad, 40)), vp.Triangle(points=((1, 1), (5, bad), (9, 1))),
               vp.Scribble(points=((1, 1), (bad, 5))), vp.Rectangle((0.1, bad, 0.5, 0.5), normalized=True),
               vp.Arrow((60, 100), (140, 40), head_size=bad)]
    for m in markers:
        with pytest.raises(ValueError, match="NaN or infinite|head_size must be a finite number"):
            vp.draw_markers(grey(), [m])
    with pytest.raises(ValueError, match="NaN or infinite"):
        polygon_mask([[2, 2, 20, bad, 12, 25]], (W, H))


def test_16bit_grey_image_is_scaled_to_8_bits_before_drawing():
    a = np.full((H, W), 128 * 256 + 77, np.uint16)
    out = np.asarray(vp.draw_markers(Image.fromarray(a), [vp.Point((100, 10), radius=2)]))
    assert out.shape == (H, W, 3) and (out[60, 100] == 128).all()


def test_unknown_colour_and_bad_style():
    with pytest.raises(ValueError, match="Unknown colour 'reddish'.*red, lime, blue, yellow, fuchsia, aqua, "
                                         "orange, purple, gold"):
        vp.Rectangle((0, 0, 10, 10), color="reddish")
    with pytest.raises(ValueError, match=r"Colour \(300, 0, 0\) must be three integers in 0-255"):
        vp.parse_color((300, 0, 0))
    with pytest.raises(ValueError, match="Unknown colour"):
        vp.parse_color("1,a,2")
    with pytest.raises(ValueError, match="Colour '1,2' must be three integers"):
        vp.parse_color("1,2")
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        vp.Point((5, 5), alpha=2)
    assert vp.parse_color("#00ff00") == (0, 255, 0) == vp.parse_color("0,255,0") == vp.parse_color("lime")
    with pytest.raises(ValueError, match="Unknown marker kind 'star'"):
        vp.make_marker("star")


def test_load_mask(tmp_path):
    m = disk_mask()
    Image.fromarray((m * 255).astype(np.uint8)).save(tmp_path / "m.png")
    np.testing.assert_array_equal(vp.load_mask(tmp_path / "m.png", size=(W, H)), m)
    with pytest.raises(ValueError, match=r"Mask shape \(120, 200\) does not match the image's"):
        vp.load_mask(tmp_path / "m.png", size=(100, 100))
    with pytest.raises(FileNotFoundError, match="Mask file not found"):
        vp.load_mask(tmp_path / "nope.png")


# --- phrases -----------------------------------------------------------------------------------------------------
def test_phrases_follow_the_training_text():
    assert vp.marker_phrase(vp.Rectangle((0, 0, 1, 1))) == "within the red rectangle"
    assert vp.marker_phrase(vp.Arrow((0, 0), (1, 1), color="blue")) == "pointed to by the blue arrow"
    assert vp.marker_phrase(vp.Point((0, 0), color=(0, 255, 255))) == "at the aqua point"  # a named colour's RGB
    assert vp.marker_phrase(vp.Scribble(box=(0, 0, 1, 1), color=(1, 2, 3))) == "with the scribble"  # unnamed
    assert vp.marker_phrase(vp.MaskContour(disk_mask(), color="orange")) == "with the orange mask contour"
    assert vp.build_question("What is the person <bbox> holding?", vp.Rectangle((0, 0, 1, 1))) == \
        "What is the person within the red rectangle holding?"
    assert vp.build_question("Describe the object.", vp.Ellipse((0, 0, 1, 1), color="gold")) == \
        "Describe the object within the gold ellipse."
    two = vp.build_question("Is the cup <bbox0> left of the dog <bbox1>?", vp.Rectangle((0, 0, 1, 1)),
                            vp.Arrow((0, 0), (1, 1), color="lime"))
    assert two == "Is the cup within the red rectangle left of the dog pointed to by the lime arrow?"


# --- more API ----------------------------------------------------------------------------------------------------
def test_kept_region_matches_the_processor_crop():
    """kept_region is what the CLIP processor keeps: feed it an image whose long axis carries a ramp of the
    pixel index, and check that each output pixel shows the original position kept_region maps it to."""
    for w, h in [(200, 120), (333, 250), (97, 401)]:
        x0, y0, x1, y1 = vp.kept_region((w, h), 336)
        long = max(w, h)
        ramp = np.arange(long) / (long - 1) * 255
        arr = np.broadcast_to(ramp[None, :, None] if w > h else ramp[:, None, None], (h, w, 3))
        pv = preprocess_image(np.ascontiguousarray(arr.round().astype(np.uint8)), ImageConfig())
        seen = (pv[0, 0, :] if w > h else pv[0, :, 0]) * 0.26862954 + 0.48145466  # un-normalised red, 0..1
        seen_index = seen * (long - 1)
        lo, hi = (x0, x1) if w > h else (y0, y1)
        j = np.arange(336)
        want = lo + (j + 0.5) * (hi - lo) / 336 - 0.5  # pixel centres
        assert np.abs(seen_index - want)[3:-3].max() < 1.5, (w, h, lo, hi)
        assert abs((hi - lo) - min(w, h)) < 1
        assert ((y0, y1) if w > h else (x0, x1)) == (0, min(w, h))


def test_crop_warning_at_the_boundary_and_names_the_marker():
    img = Image.new("RGB", (120, 200), GREY)  # tall: the crop keeps y 40..160
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vp.draw_markers(img, [vp.Rectangle((10, 40, 110, 159), width=1)])  # rows 40..159: all kept
    with pytest.warns(UserWarning, match=r"ellipse marker \(marker 2 of 2\) spans .* y 39-"):
        vp.draw_markers(img, [vp.Point((60, 100)), vp.Ellipse((10, 39, 110, 100), width=1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vp.draw_markers(img, [vp.Rectangle((10, 5, 110, 100))], warn_crop=False)
        vp.draw_markers(Image.new("RGB", (100, 100)), [vp.Rectangle((0, 0, 99, 99))])  # square: no crop


def test_make_marker_and_one_liners():
    mask = disk_mask()
    args = {"rectangle": dict(box=(50, 30, 150, 90)), "ellipse": dict(box=(50, 30, 150, 90)),
            "triangle": dict(box=(50, 30, 150, 90)), "point": dict(xy=(100, 60)),
            "arrow": dict(tail=(60, 100), head=(140, 40)), "scribble": dict(box=(50, 30, 150, 90)),
            "mask_contour": dict(mask=mask), "mask": dict(mask=mask)}
    for kind in vp.MARKER_KINDS:
        m = vp.make_marker(kind, color="gold", **args[kind])
        assert m.kind == kind and m.color == "gold"
        one = getattr(vp, f"draw_{kind}")(grey(), color="gold", warn_crop=False, **args[kind])
        np.testing.assert_array_equal(np.asarray(one), np.asarray(vp.draw_markers(grey(), [m], warn_crop=False)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.color = "red"
    with pytest.raises(TypeError):
        vp.Point()  # the position is required
    assert vp.Mask(mask).alpha == 0.35 and vp.Rectangle((0, 0, 1, 1)).alpha == 1.0


def test_mask_values_and_wrong_coordinate_counts():
    m = disk_mask()
    a = np.asarray(vp.draw_mask(grey(), m, warn_crop=False))
    for other in (m.astype(np.uint8), m.astype(np.uint8) * 255, Image.fromarray(m.astype(np.uint8) * 255)):
        np.testing.assert_array_equal(np.asarray(vp.draw_mask(grey(), other, warn_crop=False)), a)
    with pytest.raises(ValueError, match=r"rectangle: a box is \(x0, y0, x1, y1\), got 3 numbers"):
        vp.draw_markers(grey(), [vp.Rectangle((1, 2, 3))])
    with pytest.raises(ValueError, match=r"point: xy must be \(x, y\), got 3 numbers"):
        vp.draw_markers(grey(), [vp.Point((1, 2, 3))])
    with pytest.raises(ValueError, match=r"scribble: point must be \(x, y\) numbers, got 50"):
        vp.draw_scribble(grey(), (50, 30, 150, 90))  # a box passed as the polyline (first field: points)
    with pytest.raises(ValueError, match="triangle: needs 3 points, got 2"):
        vp.draw_markers(grey(), [vp.Triangle(points=((1, 2), (3, 4)))])
    with pytest.raises(ValueError, match=r"normalized xy \(1.5, 0.5\) must lie in \[0, 1\]"):
        vp.draw_markers(grey(), [vp.Point((1.5, 0.5), normalized=True)])
    with pytest.raises(ValueError, match="mask_contour: the mask is empty"):
        vp.draw_markers(grey(), [vp.MaskContour(np.zeros((H, W), bool))])


def test_phrase_colour_words_and_placeholder_errors():
    assert vp.marker_phrase(vp.Arrow((0, 0), (1, 1), color="green")) == "pointed to by the green arrow"
    assert vp.marker_phrase(vp.Rectangle((0, 0, 1, 1), color="#0000ff")) == "within the blue rectangle"
    assert vp.marker_phrase(vp.Triangle(box=(0, 0, 1, 1), color="12,34,56")) == "with the triangle"
    assert vp.marker_phrase(vp.Mask(disk_mask(), color="purple")) == "with the purple mask"
    with pytest.raises(ValueError, match="more <bboxN> placeholders than the 1 markers"):
        vp.build_question("Is <bbox0> near <bbox1>?", vp.Rectangle((0, 0, 1, 1)))
    with pytest.raises(ValueError, match="at least one marker"):
        vp.build_question("What is this?")
