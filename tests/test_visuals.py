"""Tests of the drawing pieces: screenshots of real PsychoPy windows under Xvfb, with real font files.

Expected text positions come from the font file's metrics (fontTools) and pyglet 1.5's rule for
placing one centred line, not from the code under test. Screenshots read the back buffer before the
flip, because under Xvfb the front buffer reads back black after a flip.
"""

from __future__ import annotations

import math
import os
import shutil
import unicodedata
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from loop.presentation import Stimulus
from loop.visuals import (
    FRAME_TOLERANCE_S,
    PhotodiodePatch,
    PhotodiodeSettings,
    TextLook,
    bundled_font_files,
    find_font_file,
    font_face,
    font_path,
    image_pixels,
    lay_out_right_to_left,
    make_fixation,
    make_text_stim,
    paragraph_direction,
    prepare_stimulus,
    set_text,
    visual_order,
)
from tests.display import (
    HEIGHT_PIX,
    MONITOR_DISTANCE_CM,
    MONITOR_WIDTH_CM,
    WIDTH_PIX,
    open_degree_window,
)

BACKGROUND = 128
# A pixel is ink when a channel differs from the grey background by more than this.
INK_THRESHOLD = 60

NOTO = TextLook(height_deg=1.5, wrap_width_deg=20.0)
# DejaVu Sans has Hebrew and Arabic letters, and Debian and Ubuntu install it with fontconfig.
DEJAVU = TextLook(font="DejaVu Sans", height_deg=2.0, wrap_width_deg=20.0)

SHIN, VAV = "\u05e9", "\u05d5"  # a wide and a narrow Hebrew letter
LONG_SENTENCE = (
    "The committee postponed its decision until the engineers could measure how the bridge "
    "responded to wind gusts over a whole winter."
)


@pytest.fixture(scope="module")
def window(xvfb_display: str) -> Iterator:
    window = open_degree_window("test-visuals")
    yield window
    window.close()


def screenshot(window, draw: Callable[[], None]) -> np.ndarray:
    """Draw, read the back buffer as (height, width, 3) ints with row 0 at the top, and flip."""
    draw()
    image = np.asarray(window.getMovieFrame(buffer="back"), dtype=np.int16)[..., :3]
    window.movieFrames.clear()
    window.flip()
    return image


def ink_mask(image: np.ndarray, threshold: int = INK_THRESHOLD) -> np.ndarray:
    return np.abs(image - BACKGROUND).max(axis=-1) > threshold


def ink_box(image: np.ndarray, threshold: int = INK_THRESHOLD) -> tuple[int, int, int, int] | None:
    """Return (left, top, right, bottom) of the ink in pixels, inclusive, or None for a blank frame."""
    ink = ink_mask(image, threshold)
    if not ink.any():
        return None
    rows, columns = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return int(columns[0]), int(rows[0]), int(columns[-1]), int(rows[-1])


def runs(occupied: np.ndarray) -> list[tuple[int, int]]:
    """Return the (first, last) indices of each run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], occupied.astype(int), [0]])))
    return [(int(start), int(end) - 1) for start, end in edges.reshape(-1, 2)]


def pixels_per_degree() -> float:
    from psychopy import monitors
    from psychopy.tools.monitorunittools import deg2pix

    monitor = monitors.Monitor("ppd", width=MONITOR_WIDTH_CM, distance=MONITOR_DISTANCE_CM, autoLog=False)
    monitor.setSizePix([WIDTH_PIX, HEIGHT_PIX])
    return float(deg2pix(1.0, monitor))


def line_metrics_pix(look: TextLook) -> dict[str, float]:
    """Return the em size, ascent, descent and cap height in pixels of one line of ``look``.

    TextStim requests int(0.75 * letter height in pixels) points from pyglet at 96 dpi, and FreeType
    rounds the scaled hhea ascent up and the descent down to whole pixels.
    """
    from fontTools.ttLib import TTFont

    em_pix = int(0.75 * look.height_deg * pixels_per_degree()) * 96 / 72
    with TTFont(font_path(look), lazy=True) as font:
        units_per_em = font["head"].unitsPerEm
        ascent = math.ceil(font["hhea"].ascent * em_pix / units_per_em)
        descent = math.floor(font["hhea"].descent * em_pix / units_per_em)
        cap_height = font["OS/2"].sCapHeight * em_pix / units_per_em
    return {"em": em_pix, "ascent": ascent, "descent": descent, "cap_height": cap_height}


def single_line_baseline_row(look: TextLook) -> int:
    """Return the screen row just below the baseline of one centred line, counting rows from the top.

    pyglet 1.5 puts the top of a single line anchored at "center" at ascent // 2 - descent // 4
    above the anchor (TextLayout._get_top), and the anchor is the window centre.
    """
    metrics = line_metrics_pix(look)
    ascent, descent = int(metrics["ascent"]), int(metrics["descent"])
    baseline_from_bottom = HEIGHT_PIX // 2 + ascent // 2 - descent // 4 - ascent
    return HEIGHT_PIX - baseline_from_bottom


# Settings -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "field", "shown"),
    [
        (lambda: TextLook(font=""), "font", "''"),
        (lambda: TextLook(font_file=3), "font_file", "3"),
        (lambda: TextLook(height_deg=0.0), "height_deg", "0.0"),
        (lambda: TextLook(height_deg=float("nan")), "height_deg", "nan"),
        (lambda: TextLook(height_deg=True), "height_deg", "True"),
        (lambda: TextLook(wrap_width_deg=-1.0), "wrap_width_deg", "-1.0"),
        (lambda: TextLook(height_deg=5.0, wrap_width_deg=4.0), "wrap_width_deg", "4.0"),
        (lambda: TextLook(color="whit"), "color", "'whit'"),
        (lambda: TextLook(color="#12345"), "color", "'#12345'"),
        (lambda: TextLook(color="#fff"), "color", "'#fff'"),
        (lambda: TextLook(max_lines=0), "max_lines", "0"),
        (lambda: TextLook(max_lines=2.5), "max_lines", "2.5"),
        (lambda: PhotodiodeSettings(corner="top"), "corner", "'top'"),
        (lambda: PhotodiodeSettings(size_pix=0), "size_pix", "0"),
        (lambda: PhotodiodeSettings(size_pix=True), "size_pix", "True"),
    ],
)
def test_settings_invalid_values(make, field: str, shown: str) -> None:
    with pytest.raises(ValueError) as caught:
        make()

    message = str(caught.value)
    assert field in message
    assert f"got {shown}" in message or f"({shown})" in message


def test_text_look_valid_values() -> None:
    look = TextLook(font_file="/tmp/font.ttf", color="#ff8800", max_lines=None)

    assert look.font_file == Path("/tmp/font.ttf")
    assert TextLook(color="Grey").color == "Grey"


# Fonts ----------------------------------------------------------------------------------------------------


def test_font_path_bundled_families() -> None:
    import psychopy

    font_dir = Path(psychopy.__file__).parent / "assets" / "fonts"

    assert font_path(TextLook()) == font_dir / "NotoSans-Regular.ttf"
    assert font_path(TextLook(font="noto sans")) == font_dir / "NotoSans-Regular.ttf"
    assert font_path(TextLook(font="DejaVu Serif")) == font_dir / "DejaVuSerif.ttf"
    assert font_path(TextLook(font="Arvo")) == font_dir / "Arvo-Regular.ttf"
    assert font_path(TextLook(font="JetBrains Mono")) == font_dir / "JetBrainsMono-VariableFont_wght.ttf"


def test_font_path_bundled_on_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.platform", "win32")

    assert font_path(TextLook()).name == "NotoSans-Regular.ttf"
    with pytest.raises(RuntimeError, match="Set font_file"):
        font_path(TextLook(font="DejaVu Sans"))


def test_font_path_fontconfig_family() -> None:
    path = font_path(TextLook(font="DejaVu Sans"))

    assert path.name == "DejaVuSans.ttf"
    assert path == find_font_file("DejaVu Sans")


def test_font_path_unknown_family() -> None:
    with pytest.raises(FileNotFoundError, match="'No Such Font Family' is not installed"):
        font_path(TextLook(font="No Such Font Family"))


def test_font_path_explicit_file(tmp_path: Path) -> None:
    bundled = font_path(TextLook(font="DejaVu Serif"))
    copy = tmp_path / "serif.ttf"
    shutil.copy(bundled, copy)

    assert font_path(TextLook(font="DejaVu Serif", font_file=copy)) == copy
    with pytest.raises(ValueError, match="contains the family 'DejaVu Serif', not font 'Noto Sans'"):
        font_path(TextLook(font_file=copy))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        font_path(TextLook(font_file=tmp_path / "missing.ttf"))


def test_font_face_matches_pyglet() -> None:
    # The key under which pyglet files a registered font must be the one make_text_stim requests.
    os.environ["PYGLET_SHADOW_WINDOW"] = "0"
    from pyglet.font.freetype import FreeTypeMemoryFace

    font_dir = next(iter(bundled_font_files().values())).parent
    files = sorted(font_dir.glob("*.ttf")) + [find_font_file("DejaVu Sans")]
    assert len(files) >= 10
    for path in files:
        pyglet_face = FreeTypeMemoryFace(path.read_bytes())
        face = font_face(path)
        expected = (pyglet_face.name, pyglet_face.bold, pyglet_face.italic)
        assert (face.family, face.bold, face.italic) == expected, path.name


@pytest.mark.display
def test_second_file_same_family_rejected(window, tmp_path: Path) -> None:
    make_text_stim(window, NOTO, "Registered first.")
    copy = tmp_path / "NotoSans-copy.ttf"
    shutil.copy(font_path(NOTO), copy)

    with pytest.raises(ValueError, match="'Noto Sans' is already loaded from"):
        make_text_stim(window, TextLook(font_file=copy), "Same family, other file.")


# Text direction ----------------------------------------------------------------------------------------


def test_paragraph_direction_first_strong_letter() -> None:
    assert paragraph_direction("Hello") == "L"
    assert paragraph_direction("123 " + SHIN + " abc") == "R"
    assert paragraph_direction("(123) abc " + SHIN) == "L"
    assert paragraph_direction("123 ...") == "L"


def test_visual_order_hebrew_and_latin() -> None:
    assert visual_order("plain text") == "plain text"
    assert visual_order(SHIN + VAV) == VAV + SHIN
    # Latin runs keep their order inside a right-to-left line, and the line's runs swap.
    assert visual_order(SHIN + VAV + " abc") == "abc " + VAV + SHIN
    assert visual_order("abc " + SHIN + VAV) == "abc " + VAV + SHIN


def test_visual_order_arabic_joined_forms() -> None:
    drawn = visual_order("\u0633\u0644\u0627\u0645")  # "salam": seen, lam, alef, meem

    # From the left: meem alone, because alef never joins the letter after it, then lam and alef as
    # one ligature joined to the seen before them, then seen in its initial form.
    assert [unicodedata.name(char) for char in drawn] == [
        "ARABIC LETTER MEEM ISOLATED FORM",
        "ARABIC LIGATURE LAM WITH ALEF FINAL FORM",
        "ARABIC LETTER SEEN INITIAL FORM",
    ]


def test_rtl_layout_lines_reading_order() -> None:
    words = [SHIN * 2, VAV * 2, SHIN + VAV]

    def width(line: str) -> float:
        return 10.0 * len(line)

    # Two words and a space are 50 px. A line breaks when it would be the wrap width or wider.
    assert lay_out_right_to_left(" ".join(words), width, 55.0) == (
        visual_order(" ".join(words[:2])) + "\n" + visual_order(words[2])
    )
    assert lay_out_right_to_left(" ".join(words), width, 50.0) == "\n".join(visual_order(w) for w in words)
    assert lay_out_right_to_left(" ".join(words), width, 1000.0) == visual_order(" ".join(words))


def test_rtl_layout_paragraph_direction() -> None:
    # The second line starts with a Hebrew word but belongs to a left-to-right paragraph, so its
    # Hebrew word stays on the left.
    text = "one two " + SHIN + VAV + " and"

    laid_out = lay_out_right_to_left(text, lambda line: 10.0 * len(line), 80.0)

    assert laid_out == "one two\n" + VAV + SHIN + " and"


def test_rtl_layout_long_word_paragraphs() -> None:
    text = SHIN * 9 + " " + VAV + "\n" + VAV + SHIN

    laid_out = lay_out_right_to_left(text, lambda line: 10.0 * len(line), 50.0)

    assert laid_out == "\n".join([SHIN * 9, VAV, SHIN + VAV])


# Text on screen ----------------------------------------------------------------------------------------


@pytest.mark.display
def test_sentence_single_line_position(window) -> None:
    # Flat capitals, so the ink spans exactly the cap height from the baseline.
    stim = make_text_stim(window, NOTO, "HEH THE HEH")

    left, top, right, bottom = ink_box(screenshot(window, stim.draw))

    metrics = line_metrics_pix(NOTO)
    baseline_row = single_line_baseline_row(NOTO)
    assert abs((left + right) / 2 - WIDTH_PIX / 2) <= 1.0
    assert abs(bottom - (baseline_row - 1)) <= 1
    assert abs((bottom - top + 1) - metrics["cap_height"]) <= 1.5
    assert metrics["em"] == pytest.approx(NOTO.height_deg * pixels_per_degree(), abs=1.4)


@pytest.mark.display
def test_sentence_wraps_within_width(window) -> None:
    wrap_width_pix = NOTO.wrap_width_deg * pixels_per_degree()
    stim = make_text_stim(window, NOTO, LONG_SENTENCE)

    image = screenshot(window, stim.draw)

    ink = ink_mask(image)
    left, top, right, bottom = ink_box(image)
    line_rows = runs(ink.any(axis=1))
    # 6 lines at a 398 px wrap width (measured under Xvfb with PsychoPy's Noto Sans).
    assert len(line_rows) == 6
    assert right - left + 1 <= wrap_width_pix
    assert right - left + 1 > 0.75 * wrap_width_pix, "the wrapped lines are far narrower than the wrap width"
    # pyglet 1.5 counts the space at each wrap in the line's width, so a wrapped line other than the
    # last sits up to half a space (0.26 em in Noto Sans) left of centre.
    half_space_pix = 0.5 * 0.26 * line_metrics_pix(NOTO)["em"]
    for first_row, last_row in line_rows:
        columns = runs(ink[first_row : last_row + 1].any(axis=0))
        line_centre = (columns[0][0] + columns[-1][1]) / 2
        assert WIDTH_PIX / 2 - half_space_pix - 2 <= line_centre <= WIDTH_PIX / 2 + 2, f"line at {first_row}"
    columns = runs(ink[line_rows[-1][0] : line_rows[-1][1] + 1].any(axis=0))
    assert abs((columns[0][0] + columns[-1][1]) / 2 - WIDTH_PIX / 2) <= 1.5, "the last line is not centred"
    line_pitch_pix = line_metrics_pix(NOTO)["ascent"] - line_metrics_pix(NOTO)["descent"]
    assert abs((top + bottom) / 2 - HEIGHT_PIX / 2) <= 0.5 * line_pitch_pix
    assert bottom - top + 1 > 5 * line_pitch_pix


@pytest.mark.display
def test_fixation_small_and_centred(window) -> None:
    left, top, right, bottom = ink_box(screenshot(window, make_fixation(window, NOTO).draw))

    assert abs((left + right) / 2 - WIDTH_PIX / 2) <= 1.0
    assert right - left + 1 < line_metrics_pix(NOTO)["em"]


@pytest.mark.display
def test_hebrew_first_letter_rightmost(window) -> None:
    shin_width = _ink_width(screenshot(window, make_text_stim(window, DEJAVU, SHIN).draw))
    vav_width = _ink_width(screenshot(window, make_text_stim(window, DEJAVU, VAV).draw))
    assert shin_width > 3 * vav_width, "the two letters must be easy to tell apart"

    # Shin is the first letter in reading order, so a right-to-left line draws it on the right.
    image = screenshot(window, make_text_stim(window, DEJAVU, SHIN + VAV).draw)

    (left_start, left_end), (right_start, right_end) = runs(ink_mask(image).any(axis=0))
    assert abs((right_end - right_start + 1) - shin_width) <= 1
    assert abs((left_end - left_start + 1) - vav_width) <= 1


@pytest.mark.display
def test_set_text_reorders_reused_stim(window) -> None:
    stim = make_text_stim(window, DEJAVU, "Latin first.")

    set_text(stim, VAV + SHIN)
    left, right = runs(ink_mask(screenshot(window, stim.draw)).any(axis=0))
    assert left[1] - left[0] > right[1] - right[0], "shin should be on the left after vav"

    set_text(stim, SHIN + VAV)
    left, right = runs(ink_mask(screenshot(window, stim.draw)).any(axis=0))
    assert left[1] - left[0] < right[1] - right[0], "shin should be on the right before vav"


@pytest.mark.display
def test_hebrew_wrapped_lines_top_to_bottom(window) -> None:
    # Three wide words, then three narrow ones, at a wrap width that fits three words of either.
    wide, narrow = SHIN * 4, VAV * 4
    three_wide_deg = _ink_width_deg(window, " ".join([wide] * 3))
    look = TextLook(font="DejaVu Sans", height_deg=2.0, wrap_width_deg=three_wide_deg + 1.0)
    stim = make_text_stim(window, look, " ".join([wide] * 3 + [narrow] * 3))

    image = screenshot(window, stim.draw)

    ink = ink_mask(image)
    line_rows = runs(ink.any(axis=1))
    assert len(line_rows) == 2
    (top_start, top_end), (bottom_start, bottom_end) = line_rows
    # The first words in reading order go on the top line. PsychoPy's own languageStyle "RTL"
    # reorders before wrapping, which would put the narrow words on top.
    assert ink[top_start : top_end + 1].sum() > 3 * ink[bottom_start : bottom_end + 1].sum()


def _ink_width(image: np.ndarray) -> int:
    left, _, right, _ = ink_box(image)
    return right - left + 1


def _ink_width_deg(window, text: str) -> float:
    stim = make_text_stim(window, DEJAVU, text)
    return stim.boundingBox[0] / pixels_per_degree()


# RSVP -----------------------------------------------------------------------------------------------------


@pytest.mark.display
def test_rsvp_word_by_elapsed_time(window) -> None:
    word_duration_s = 0.25
    words = ["I", "HE", "HHHHHH"]  # ink widths far apart, so each frame names its word
    prepared = prepare_stimulus(
        window, Stimulus("s1", "  ".join(words) + " "), NOTO, "rsvp", word_duration_s, image_size_deg=5.0
    )
    assert prepared.n_words == 3
    assert prepared.words_duration_s == pytest.approx(0.75)
    assert prepared.text == "  ".join(words) + " "

    widths = []
    for k in range(len(words)):
        at_start = screenshot(window, lambda k=k: prepared.draw(k * word_duration_s))
        late_in_word = screenshot(window, lambda k=k: prepared.draw((k + 0.9) * word_duration_s))
        # A frame due just before the word's start, within the tolerance, shows the word too.
        just_before = screenshot(
            window, lambda k=k: prepared.draw(k * word_duration_s - FRAME_TOLERANCE_S / 2)
        )
        left, _, right, _ = ink_box(at_start)
        assert abs((left + right) / 2 - WIDTH_PIX / 2) <= 1.0, f"word {k} is not centred"
        assert np.array_equal(at_start, late_in_word)
        assert np.array_equal(at_start, just_before)
        widths.append(right - left + 1)

    assert widths == sorted(widths)
    assert widths[2] > 2 * widths[1] > 4 * widths[0]
    assert ink_box(screenshot(window, lambda: prepared.draw(3 * word_duration_s))) is None
    assert ink_box(screenshot(window, lambda: prepared.draw(10.0))) is None
    assert ink_box(screenshot(window, lambda: prepared.draw(-0.1))) is None


@pytest.mark.display
def test_rsvp_invalid_word_duration(window) -> None:
    with pytest.raises(ValueError, match="word_duration_s must be a positive number of seconds, got 0"):
        prepare_stimulus(window, Stimulus("s1", "two words"), NOTO, "rsvp", 0, image_size_deg=5.0)
    with pytest.raises(ValueError, match="mode must be one of sentence, rsvp, got 'scroll'"):
        prepare_stimulus(window, Stimulus("s1", "two words"), NOTO, "scroll", 0.2, image_size_deg=5.0)


@pytest.mark.display
def test_sentence_same_every_frame(window) -> None:
    prepared = prepare_stimulus(window, Stimulus("s1", "Short sentence."), NOTO, "sentence", 0.2, 5.0)

    first = screenshot(window, lambda: prepared.draw(0.0))
    later = screenshot(window, lambda: prepared.draw(3.0))

    assert prepared.kind == "sentence"
    assert prepared.n_words == 0
    assert prepared.words_duration_s is None
    assert ink_box(first) is not None
    assert np.array_equal(first, later)


# Images ---------------------------------------------------------------------------------------------------

# A 2 x 3 grid of colour blocks, top row first, as RGB in [0, 1].
BLOCK_COLORS = np.array(
    [
        [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0, 0.0]],
    ]
)
# Grey levels of the same grid, none near the background's 0.5.
BLOCK_GREYS = np.array([[0.0, 0.2, 0.35], [1.0, 0.8, 0.65]])
BLOCK_PIX = 10


def block_image(blocks: np.ndarray) -> np.ndarray:
    """Repeat each block BLOCK_PIX times along both axes: (2, 3, ...) to (20, 30, ...)."""
    return np.repeat(np.repeat(blocks, BLOCK_PIX, axis=0), BLOCK_PIX, axis=1)


def check_block_image(image: np.ndarray, blocks: np.ndarray, image_size_deg: float) -> None:
    """Check that ``image`` shows ``blocks`` centred, the right way up, with its longer side at size."""
    left, top, right, bottom = ink_box(image, threshold=10)
    n_rows, n_columns = blocks.shape[:2]
    long_side_pix = image_size_deg * pixels_per_degree()
    width_pix, height_pix = right - left + 1, bottom - top + 1
    expected_width = long_side_pix * n_columns / max(n_rows, n_columns)
    expected_height = long_side_pix * n_rows / max(n_rows, n_columns)
    assert abs(width_pix - expected_width) <= 1.5
    assert abs(height_pix - expected_height) <= 1.5
    assert abs((left + right) / 2 - WIDTH_PIX / 2) <= 1.0
    assert abs((top + bottom) / 2 - HEIGHT_PIX / 2) <= 1.0

    expected_rgb = blocks if blocks.ndim == 3 else np.repeat(blocks[..., np.newaxis], 3, axis=2)
    for row in range(n_rows):
        for column in range(n_columns):
            y = round(top + (row + 0.5) * height_pix / n_rows)
            x = round(left + (column + 0.5) * width_pix / n_columns)
            expected = np.round(expected_rgb[row, column] * 255)
            assert np.abs(image[y, x] - expected).max() <= 2, f"block ({row}, {column}) at ({x}, {y})"


def show_image(window, image, image_size_deg: float = 12.0) -> np.ndarray:
    look = TextLook()
    stimulus = Stimulus("img", "label", image=image)
    prepared = prepare_stimulus(window, stimulus, look, "sentence", 0.2, image_size_deg)
    assert prepared.kind == "image"
    assert prepared.text == "label"
    return screenshot(window, lambda: prepared.draw(0.0))


@pytest.mark.display
def test_image_rgb_float(window) -> None:
    check_block_image(show_image(window, block_image(BLOCK_COLORS)), BLOCK_COLORS, 12.0)


@pytest.mark.display
def test_image_rgb_uint8(window) -> None:
    array = np.round(block_image(BLOCK_COLORS) * 255).astype(np.uint8)

    check_block_image(show_image(window, array), BLOCK_COLORS, 12.0)


@pytest.mark.display
def test_image_grey_float_and_uint8(window) -> None:
    check_block_image(show_image(window, block_image(BLOCK_GREYS)), BLOCK_GREYS, 12.0)

    array = np.round(block_image(BLOCK_GREYS) * 255).astype(np.uint8)
    check_block_image(show_image(window, array), np.round(BLOCK_GREYS * 255) / 255, 12.0)


@pytest.mark.display
def test_image_portrait_long_side(window) -> None:
    portrait = np.swapaxes(BLOCK_COLORS, 0, 1)  # 3 rows, 2 columns

    check_block_image(show_image(window, block_image(portrait), 8.0), portrait, 8.0)


@pytest.mark.display
def test_image_files(window, tmp_path: Path) -> None:
    from PIL import Image

    rgb_path = tmp_path / "blocks.png"
    Image.fromarray(np.round(block_image(BLOCK_COLORS) * 255).astype(np.uint8)).save(rgb_path)
    check_block_image(show_image(window, rgb_path), BLOCK_COLORS, 12.0)
    check_block_image(show_image(window, str(rgb_path)), BLOCK_COLORS, 12.0)

    grey16_path = tmp_path / "grey16.png"
    Image.fromarray(np.round(block_image(BLOCK_GREYS) * 65535).astype(np.uint16)).save(grey16_path)
    check_block_image(show_image(window, grey16_path), BLOCK_GREYS, 12.0)

    opaque = np.concatenate([np.round(block_image(BLOCK_COLORS) * 255), np.full((20, 30, 1), 255.0)], axis=2)
    opaque_path = tmp_path / "opaque.png"
    Image.fromarray(opaque.astype(np.uint8), mode="RGBA").save(opaque_path)
    check_block_image(show_image(window, opaque_path), BLOCK_COLORS, 12.0)


@pytest.mark.display
def test_image_downscaled_averages(window) -> None:
    # A one-pixel checkerboard shown at a fifth of its size must average to mid-grey, not alias.
    checkerboard = (np.indices((500, 500)).sum(axis=0) % 2).astype(np.uint8) * 255

    image = show_image(window, checkerboard, image_size_deg=5.0)

    centre = image[HEIGHT_PIX // 2 - 20 : HEIGHT_PIX // 2 + 20, WIDTH_PIX // 2 - 20 : WIDTH_PIX // 2 + 20]
    assert np.abs(centre - 127.5).max() <= 3


def test_image_pixels_scales_to_unit_range() -> None:
    grey = np.array([[0, 51], [204, 255]], dtype=np.uint8)

    pixels = image_pixels(Stimulus("g", "grey", image=grey))

    assert pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, [[0.0, 0.2], [0.8, 1.0]], atol=1e-6)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 4, 4)), r"shape \(4, 4, 4\)"),
        (np.zeros(16), r"shape \(16,\)"),
        (np.zeros((0, 4)), r"shape \(0, 4\)"),
        (np.zeros((4, 4), dtype=np.int64), "dtype int64"),
        (np.full((4, 4), 1.5), "finite values in \\[0, 1\\], got values from 1.5 to 1.5"),
        (np.array([[0.0, np.nan]]), "finite values"),
        (["not", "an", "array"], "got list"),
    ],
)
def test_image_array_rejected(image, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        image_pixels(Stimulus("bad-image-7", "label", image=image))

    assert "'bad-image-7'" in str(caught.value)


def test_image_file_rejected(tmp_path: Path) -> None:
    from PIL import Image

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a PNG")
    transparent = tmp_path / "transparent.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(transparent)

    cases = [
        (tmp_path / "missing.png", "failed to read image file"),
        (not_an_image, "failed to read image file"),
        (transparent, "has transparent pixels"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as caught:
            image_pixels(Stimulus("file-3", "label", image=path))
        assert "'file-3'" in str(caught.value)
        assert path.name in str(caught.value)


@pytest.mark.display
def test_image_size_invalid(window) -> None:
    with pytest.raises(ValueError, match="image_size_deg must be a positive size"):
        show_image(window, block_image(BLOCK_COLORS), image_size_deg=0.0)


# Photodiode -----------------------------------------------------------------------------------------------


@pytest.mark.display
@pytest.mark.parametrize("corner", ["top_left", "top_right", "bottom_left", "bottom_right"])
def test_photodiode_patch_in_corner(window, corner: str) -> None:
    size = 60
    patch = PhotodiodePatch(window, PhotodiodeSettings(corner=corner, size_pix=size))
    vertical, horizontal = corner.split("_")
    rows = slice(0, size) if vertical == "top" else slice(HEIGHT_PIX - size, HEIGHT_PIX)
    columns = slice(0, size) if horizontal == "left" else slice(WIDTH_PIX - size, WIDTH_PIX)

    for on, level in ((True, 255), (False, 0)):
        image = screenshot(window, lambda on=on: patch.draw(on))

        expected = np.full_like(image, BACKGROUND)
        expected[rows, columns] = level
        assert np.array_equal(image, expected), f"{corner} patch with on={on} is not a {size} px square"


@pytest.mark.display
def test_photodiode_patch_too_large(window) -> None:
    with pytest.raises(ValueError, match="size_pix 700 is larger than the 800x600 px window"):
        PhotodiodePatch(window, PhotodiodeSettings(size_pix=700))
