"""Build what the PsychoPy presenter draws: text (whole or word by word), images and a photodiode patch.

Runs in the controller process, in the thread that owns the PsychoPy window, because building a
stimulus uploads textures to that window's OpenGL context. Lengths are in degrees of visual angle, so
the window needs a monitor with its width, distance and size in pixels set. PsychoPy is imported inside
the functions, so that configuration code can import :class:`TextLook` without a display.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from loop.presentation import Stimulus

if TYPE_CHECKING:
    from psychopy.visual import ImageStim, TextStim, Window

PresentationMode = Literal["sentence", "rsvp"]
Corner = Literal["top_left", "top_right", "bottom_left", "bottom_right"]
PRESENTATION_MODES = ("sentence", "rsvp")
CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")

# A frame predicted this close before a word's due time shows that word, so that rounding in the
# measured frame period cannot delay every word by a frame. PsychoPy Builder scripts use the same value
# (frameTolerance in psychopy/experiment/flow.py, PsychoPy 2026.2).
FRAME_TOLERANCE_S = 0.001

# TextStim lays text out with pyglet at int(0.75 * letter height in pixels) points and pyglet's default
# 96 dpi (TextStim._setTextShaders, PsychoPy 2026.2), so the em size is that many points times 96 / 72.
POINTS_PER_PIXEL = 0.75
PYGLET_DPI = 96

# The shaping TextStim applies for languageStyle "Arabic" (psychopy/visual/text.py, PsychoPy 2026.2).
ARABIC_RESHAPER_CONFIGURATION = {"delete_harakat": False, "shift_harakat_position": True}

HEX_COLOR_PATTERN = re.compile(r"#[0-9a-fA-F]{6}")


@dataclass(frozen=True)
class TextLook:
    """The look of sentences, RSVP words, messages and the fixation cross.

    ``height_deg`` is the letter height (the font's em size) and ``wrap_width_deg`` the width at which
    lines wrap, both in degrees of visual angle. ``font_file`` names the file to draw with. Without
    it, :func:`font_path` finds the file of ``font``. ``max_lines`` limits how many lines a sentence
    may take (None for no limit), which the checks before a run enforce.
    """

    font: str = "Noto Sans"
    font_file: Path | None = None
    height_deg: float = 1.0
    wrap_width_deg: float = 30.0
    color: str = "white"
    max_lines: int | None = 3

    def __post_init__(self) -> None:
        if not isinstance(self.font, str) or not self.font.strip():
            raise ValueError(f"font must be a font family name such as 'Noto Sans', got {self.font!r}.")
        if self.font_file is not None:
            if not isinstance(self.font_file, str | os.PathLike):
                raise ValueError(
                    f"font_file must be the path of a .ttf or .otf file, or None, got {self.font_file!r}."
                )
            object.__setattr__(self, "font_file", Path(self.font_file))
        for name in ("height_deg", "wrap_width_deg"):
            value = getattr(self, name)
            if not _is_positive_number(value):
                raise ValueError(
                    f"{name} must be a positive length in degrees of visual angle, got {value!r}."
                )
        if self.height_deg > self.wrap_width_deg:
            raise ValueError(
                f"height_deg ({self.height_deg!r}) must not exceed wrap_width_deg ({self.wrap_width_deg!r}), "
                "or no letter fits on a line."
            )
        _check_color("color", self.color)
        if self.max_lines is not None and (
            isinstance(self.max_lines, bool) or not isinstance(self.max_lines, int) or self.max_lines < 1
        ):
            raise ValueError(
                f"max_lines must be an integer of 1 or more, or None for no limit, got {self.max_lines!r}."
            )


@dataclass(frozen=True)
class PhotodiodeSettings:
    """A square in a screen corner that turns white on each stimulus onset, for a photodiode to see."""

    corner: Corner = "bottom_left"
    size_pix: int = 60

    def __post_init__(self) -> None:
        if self.corner not in CORNERS:
            raise ValueError(f"corner must be one of {', '.join(CORNERS)}, got {self.corner!r}.")
        if isinstance(self.size_pix, bool) or not isinstance(self.size_pix, int) or self.size_pix < 1:
            raise ValueError(
                f"size_pix must be a whole number of pixels of 1 or more, got {self.size_pix!r}."
            )


# Fonts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FontFace:
    """The family name and style that pyglet files a font file under once it is registered."""

    family: str
    bold: bool
    italic: bool


def font_path(look: TextLook) -> Path:
    """Return the font file that :func:`make_text_stim` draws ``look`` with.

    An explicit ``font_file`` wins, and its family must be ``look.font``. Otherwise a font that PsychoPy
    ships (in psychopy/assets/fonts, such as Noto Sans, DejaVu Serif and Arvo) resolves to that file on
    every OS, and any other family to the file fontconfig finds on Linux. On Windows and macOS a family
    that PsychoPy does not ship needs ``font_file``.
    """
    if look.font_file is not None:
        if not look.font_file.is_file():
            raise FileNotFoundError(
                f"font_file {str(look.font_file)!r} does not exist or is not a file. "
                "Set font_file to an existing .ttf or .otf file."
            )
        family = font_face(look.font_file).family
        if family.lower() != look.font.lower():
            raise ValueError(
                f"font_file {str(look.font_file)!r} contains the family {family!r}, not font {look.font!r}. "
                f"Set font to {family!r}, or font_file to a file of {look.font!r}."
            )
        return look.font_file

    bundled = bundled_font_files().get(look.font.lower())
    if bundled is not None:
        return bundled
    return find_font_file(look.font)


@functools.lru_cache
def bundled_font_files() -> dict[str, Path]:
    """Return the upright, regular-weight fonts that PsychoPy ships, by lower-case family name."""
    spec = find_spec("psychopy")
    if spec is None or not spec.submodule_search_locations:
        return {}
    font_dir = Path(next(iter(spec.submodule_search_locations))) / "assets" / "fonts"

    files: dict[str, Path] = {}
    for path in sorted(font_dir.glob("*.ttf")):
        face = font_face(path)
        if not face.bold and not face.italic:
            files.setdefault(face.family.lower(), path)
    return files


@functools.lru_cache
def font_face(font_file: Path) -> FontFace:
    """Read the family name and style under which pyglet registers ``font_file``.

    pyglet 1.5 files a registered font under FreeType's family name and style flags. FreeType takes
    the typographic family name (name ID 16) when the font has one, else the family name (ID 1), and
    the style from the OS/2 fsSelection bits, or from head.macStyle in fonts without an OS/2 table.
    """
    from fontTools.ttLib import TTFont, TTLibError

    try:
        with TTFont(font_file, lazy=True) as font:
            names = font["name"]
            family = names.getDebugName(16) or names.getDebugName(1)
            if "OS/2" in font:
                selection = font["OS/2"].fsSelection
                bold, italic = bool(selection & 0x20), bool(selection & 0x01)
            else:
                style = font["head"].macStyle
                bold, italic = bool(style & 0x01), bool(style & 0x02)
    except (OSError, TTLibError, KeyError) as err:
        raise ValueError(
            f"Failed to read font file {str(font_file)!r} ({err}). Use a TrueType or OpenType font file."
        ) from err
    if not family:
        raise ValueError(
            f"Font file {str(font_file)!r} has no family name, so pyglet cannot load it by name."
        )
    return FontFace(family, bold, italic)


def find_font_file(font_name: str) -> Path:
    """Find the file of the font family ``font_name`` with fontconfig, as pyglet does on Linux.

    For an unknown family fontconfig returns a fallback font, which pyglet would draw silently, so
    that raises here.
    """
    if not sys.platform.startswith("linux"):
        # NOTE: pyglet uses Quartz on macOS and GDI+ or DirectWrite on Windows, and neither gives a
        # file path, so fonts that PsychoPy does not ship need font_file there.
        raise RuntimeError(
            f"Finding the file of font {font_name!r} works only on Linux (fontconfig), not on "
            f"{sys.platform}. Set font_file in the text settings to the font's .ttf or .otf file."
        )

    _disable_pyglet_shadow_window()
    from pyglet.font.fontconfig import get_fontconfig

    match = get_fontconfig().find_font(font_name)
    matched_family = match.name if match else None
    if not match or not match.file or (matched_family or "").lower() != font_name.lower():
        raise FileNotFoundError(
            f"Font {font_name!r} is not installed, and fontconfig offers {matched_family!r} in its "
            "place, which PsychoPy would draw without a warning. Install the font (copy its files into "
            "~/.local/share/fonts and run fc-cache), set font_file to its file, or set the font to a "
            "family that `fc-list : family` lists."
        )
    return Path(match.file)


# pyglet keeps one registered file per (family, bold, italic) for the whole process, and caches the
# fonts it loads, so a second file of the same face could not replace the first one.
_registered_font_files: dict[FontFace, Path] = {}


def _font_files_to_register(path: Path, face: FontFace) -> list[str]:
    """Return ``[path]`` the first time the face is drawn, and [] once pyglet has that file already."""
    registered = _registered_font_files.get(face)
    if registered is None:
        _registered_font_files[face] = path.resolve()
        return [str(path)]
    if registered != path.resolve():
        raise ValueError(
            f"Font family {face.family!r} is already loaded from {str(registered)!r} in this process, so "
            f"{str(path)!r} cannot be drawn too: pyglet keeps one file per family and style. Use one file "
            "for each family in a session."
        )
    return []


# Text direction ---------------------------------------------------------------------------------------


def has_right_to_left(text: str) -> bool:
    """Return whether ``text`` contains a right-to-left letter (Hebrew, Arabic, Syriac, Thaana, ...)."""
    return any(unicodedata.bidirectional(char) in ("R", "AL") for char in text)


def paragraph_direction(paragraph: str) -> Literal["L", "R"]:
    """Return the base direction of a paragraph: that of its first strong letter (Unicode rules P2, P3)."""
    for char in paragraph:
        direction = unicodedata.bidirectional(char)
        if direction == "L":
            return "L"
        if direction in ("R", "AL"):
            return "R"
    return "L"


def visual_order(line: str, base_direction: Literal["L", "R"] | None = None) -> str:
    """Return one line as drawn: Arabic letters in their joined forms and characters in display order.

    This is the transformation of TextStim's languageStyle "Arabic" (reshaping, then the Unicode
    bidirectional algorithm of python-bidi), applied to one line. ``base_direction`` defaults to the
    line's own. A left-to-right line is returned unchanged.
    """
    base_direction = base_direction or paragraph_direction(line)
    if base_direction == "L" and not has_right_to_left(line):
        return line
    from bidi.algorithm import get_display

    return get_display(join_arabic_letters(line), base_dir=base_direction)


def join_arabic_letters(text: str) -> str:
    """Return ``text`` in reading order with Arabic letters replaced by their joined presentation forms.

    pyglet draws one glyph per code point without OpenType shaping, so the forms of the Arabic
    Presentation Forms blocks are what the font must contain. Text without Arabic letters is returned
    unchanged.
    """
    if not any(unicodedata.bidirectional(char) == "AL" for char in text):
        return text
    from arabic_reshaper import ArabicReshaper

    return ArabicReshaper(configuration=ARABIC_RESHAPER_CONFIGURATION).reshape(text)


def lay_out_right_to_left(text: str, measure_width: Callable[[str], float], wrap_width_pix: float) -> str:
    """Break ``text`` into lines in reading order and return the lines in visual order, joined by newlines.

    TextStim reorders a whole right-to-left text before pyglet wraps it, so a wrapped Hebrew or Arabic
    sentence would show its last words on the first line. Here the words fill each line in reading
    order and each line is reordered on its own, with the base direction of its paragraph, as the
    Unicode bidirectional algorithm does after line breaking. ``measure_width`` returns the width in
    pixels of a line in visual order. A line breaks before the word that would make it
    ``wrap_width_pix`` or wider, which is pyglet 1.5's rule, so pyglet adds no break of its own. The
    space at each break becomes the newline, and a word wider than a line stays whole on its own line.
    """
    visual_lines = []
    for paragraph in text.split("\n"):
        direction = paragraph_direction(paragraph)
        words = paragraph.split(" ")
        lines: list[str] = []
        line = words[0]
        for word in words[1:]:
            candidate = f"{line} {word}"
            # An empty word is a second space, which never starts a line in pyglet either.
            if word and line.strip() and measure_width(visual_order(candidate, direction)) >= wrap_width_pix:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
        visual_lines += [visual_order(line, direction) for line in lines]
    return "\n".join(visual_lines)


# Text stimuli -----------------------------------------------------------------------------------------


def make_text_stim(window: Window, look: TextLook, text: str) -> TextStim:
    """Create a centred TextStim in degrees that shows ``text`` in the font file of :func:`font_path`.

    The file is registered through TextStim's fontFiles argument and the stimulus requests the family
    and style read from that file, so the file that the glyph check reads is the file drawn. Change
    its text with :func:`set_text`, which lays out right-to-left text.

    NOTE: pyglet 1.5 counts the space at a wrap in the line's width, so each wrapped left-to-right line
    but the last sits up to half a space left of centre (5 px at a 29 px em, measured under Xvfb).
    """
    from psychopy import visual

    path = font_path(look)
    face = font_face(path)
    stim = visual.TextStim(
        window,
        text="",
        font=face.family,
        fontFiles=_font_files_to_register(path, face),
        bold=face.bold,
        italic=face.italic,
        units="deg",
        height=look.height_deg,
        wrapWidth=look.wrap_width_deg,
        color=look.color,
        alignText="center",
        anchorHoriz="center",
        anchorVert="center",
        # The presenter's text arrives in visual order from set_text, so TextStim must not reorder it.
        languageStyle="LTR",
        autoLog=False,
    )
    set_text(stim, text)
    return stim


def set_text(stim: TextStim, text: str) -> None:
    """Set the text of a stimulus from :func:`make_text_stim`, in visual order for right-to-left text.

    ``stim.text`` then contains the text as drawn, which for right-to-left text differs from ``text``
    in order, in Arabic letter forms and in newlines at the line breaks. Markers carry ``text``.
    """
    if has_right_to_left(text):
        font = _layout_font(stim)
        text = lay_out_right_to_left(
            text,
            measure_width=lambda line: sum(glyph.advance for glyph in font.get_glyphs(line)),
            wrap_width_pix=_to_pixels(stim, stim.wrapWidth, axis=0),
        )
    stim.text = text


def make_fixation(window: Window, look: TextLook, text: str = "+") -> TextStim:
    """Create the fixation mark shown between stimuli: ``text``, a "+" by default, in the text's look."""
    return make_text_stim(window, look, text)


def _layout_font(stim: TextStim):
    """Load the pyglet font that TextStim lays ``stim`` out with (_setTextShaders, PsychoPy 2026.2)."""
    import pyglet

    size_points = int(_to_pixels(stim, stim.height, axis=1) * POINTS_PER_PIXEL)
    return pyglet.font.load(stim.font, size_points, bold=stim.bold, italic=stim.italic, dpi=PYGLET_DPI)


def _to_pixels(stim: TextStim, length: float, axis: int) -> float:
    """Convert a length along ``axis`` (0: x, 1: y) from the stimulus units to pixels, as TextStim does."""
    from psychopy.tools.monitorunittools import convertToPix

    vertices = np.zeros(2)
    vertices[axis] = length
    return float(convertToPix(vertices=vertices, pos=np.zeros(2), units=stim.units, win=stim.win)[axis])


# Images -----------------------------------------------------------------------------------------------


def image_pixels(stimulus: Stimulus) -> np.ndarray:
    """Return the stimulus image as floats in [0, 1], shape (height, width) or (height, width, 3).

    Reads a file with Pillow. Raises ValueError naming the stimulus for an unreadable file, a file
    with transparent pixels, or an array of the wrong shape, type or range.
    """
    image = stimulus.image
    if isinstance(image, str | os.PathLike):
        return _read_image_file(stimulus.stimulus_id, Path(image))
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"Stimulus {stimulus.stimulus_id!r}: image must be a file path or a numpy array, "
            f"got {type(image).__name__}."
        )

    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3) or 0 in image.shape:
        raise ValueError(
            f"Stimulus {stimulus.stimulus_id!r}: the image array has shape {image.shape}, but it must be "
            "(height, width) for grey levels or (height, width, 3) for RGB, with no side of 0."
        )
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"Stimulus {stimulus.stimulus_id!r}: the image array has dtype {image.dtype}, but it must be "
            "uint8 (0 to 255) or float (0 to 1)."
        )
    if not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
        raise ValueError(
            f"Stimulus {stimulus.stimulus_id!r}: a float image array must have finite values in [0, 1], "
            f"got values from {float(np.nanmin(image)):g} to {float(np.nanmax(image)):g}."
        )
    return image.astype(np.float32)


def _read_image_file(stimulus_id: str, path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            opened.load()
            image = opened.copy()
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise ValueError(
            f"Stimulus {stimulus_id!r}: failed to read image file {str(path)!r} ({err})."
        ) from err

    if image.mode.startswith("I;16"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode in ("I", "F"):
        raise ValueError(
            f"Stimulus {stimulus_id!r}: image file {str(path)!r} has 32-bit {image.mode!r} pixels, whose "
            "range is not defined. Save it with 8 or 16 bits a channel."
        )
    if "A" in image.getbands() or "transparency" in image.info:
        image = image.convert("RGBA")
        if np.asarray(image)[..., 3].min() < 255:
            raise ValueError(
                f"Stimulus {stimulus_id!r}: image file {str(path)!r} has transparent pixels, which would "
                "show whatever colour they hide. Flatten it onto the background colour first."
            )
    if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode == "1" else "RGB")
    return np.asarray(image, dtype=np.float32) / 255.0


def make_image_stim(window: Window, stimulus: Stimulus, image_size_deg: float) -> ImageStim:
    """Create a centred ImageStim whose longer side is ``image_size_deg``, keeping the aspect ratio."""
    from psychopy import visual

    if not _is_positive_number(image_size_deg):
        raise ValueError(
            f"image_size_deg must be a positive size in degrees of visual angle, got {image_size_deg!r}."
        )
    pixels = image_pixels(stimulus)
    height, width = pixels.shape[:2]
    scale_deg = image_size_deg / max(height, width)

    # An RGB array goes to ImageStim's "imageStim" shader, which reads the texture as unsigned, so
    # values stay in [0, 1] (psychopy/visual/shaders.py, PsychoPy 2026.2). A grey-level array would go
    # to a shader for signed textures in [-1, 1] tinted by the colour, so it is sent as RGB too.
    # OpenGL puts a texture's first row at the bottom, hence the flip, and ImageStim passes the array's
    # memory to OpenGL, so the flipped array must be contiguous.
    # NOTE: the texture is float32 RGB, 12 bytes a pixel, so a 4000 x 3000 photo takes 144 MB and a
    # noticeable upload time. Resize large images to about their displayed size beforehand.
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, np.newaxis], 3, axis=2)
    texture = np.ascontiguousarray(np.flipud(pixels), dtype=np.float32)
    stim = visual.ImageStim(
        window,
        image=texture,
        units="deg",
        size=(width * scale_deg, height * scale_deg),
        interpolate=True,
        autoLog=False,
    )
    _set_texture_sampling(stim)
    return stim


def _set_texture_sampling(stim: ImageStim) -> None:
    """Make the image's texture sample its own edge texels and its mipmaps.

    ImageStim clamps a non-repeating texture to a black border (GL_CLAMP_TO_BORDER in
    TextureMixin._createTexture, PsychoPy 2026.2), so linear interpolation darkens the outer half
    texel of every edge. It also builds mipmaps but samples only the full-size level, so a
    downscaled image aliases. The texture is bound to set both and unbound after.
    """
    from pyglet import gl

    gl.glBindTexture(gl.GL_TEXTURE_2D, stim._texID)
    for axis in (gl.GL_TEXTURE_WRAP_S, gl.GL_TEXTURE_WRAP_T):
        gl.glTexParameteri(gl.GL_TEXTURE_2D, axis, gl.GL_CLAMP_TO_EDGE)
    gl.glTexParameteri(gl.GL_TEXTURE_2D, gl.GL_TEXTURE_MIN_FILTER, gl.GL_LINEAR_MIPMAP_LINEAR)
    gl.glBindTexture(gl.GL_TEXTURE_2D, 0)


# Prepared stimuli ------------------------------------------------------------------------------------


class PreparedStimulus:
    """One stimulus laid out and ready to draw.

    Laying out text or uploading an image can take longer than a frame, so the presenter builds this
    before the due time and its frames only call :meth:`draw`. ``text`` is the stimulus text as the
    markers carry it. Build it with :func:`prepare_stimulus`.
    """

    def __init__(
        self,
        stimulus_id: str,
        text: str,
        kind: Literal["sentence", "rsvp", "image"],
        parts: Sequence[TextStim | ImageStim],
        word_duration_s: float | None = None,
    ) -> None:
        self.stimulus_id = stimulus_id
        self.text = text
        self.kind = kind
        self.word_duration_s = word_duration_s
        self._parts = tuple(parts)

    @property
    def n_words(self) -> int:
        """The number of RSVP words, or 0 for a whole sentence or an image."""
        return len(self._parts) if self.kind == "rsvp" else 0

    @property
    def words_duration_s(self) -> float | None:
        """Seconds from onset to the end of the last RSVP word, or None when shown for the whole trial."""
        if self.kind != "rsvp":
            return None
        return self.n_words * self.word_duration_s

    @property
    def stims(self) -> tuple[TextStim | ImageStim, ...]:
        """The PsychoPy stimuli drawn: one for a sentence or an image, one per word for RSVP."""
        return self._parts

    def draw(self, elapsed_s: float) -> None:
        """Draw the frame that shows ``elapsed_s`` seconds after onset, without flipping.

        RSVP shows word floor(elapsed_s / word_duration_s) and nothing after the last word or before
        onset, with a frame due within FRAME_TOLERANCE_S of a word's start counted as that word's.
        Sentences and images look the same in every frame.
        """
        if self.kind != "rsvp":
            self._parts[0].draw()
            return
        index = math.floor((elapsed_s + FRAME_TOLERANCE_S) / self.word_duration_s)
        if 0 <= index < len(self._parts):
            self._parts[index].draw()


def prepare_stimulus(
    window: Window,
    stimulus: Stimulus,
    look: TextLook,
    mode: PresentationMode,
    word_duration_s: float,
    image_size_deg: float,
) -> PreparedStimulus:
    """Lay out ``stimulus`` for ``window``: its whole text, its words one at a time (RSVP), or its image.

    An image stimulus ignores ``mode``, and its text is only the label in the markers. RSVP splits the
    text at whitespace and centres each word. Raises ValueError naming the stimulus for an image that
    cannot be shown.
    """
    if mode not in PRESENTATION_MODES:
        raise ValueError(f"mode must be one of {', '.join(PRESENTATION_MODES)}, got {mode!r}.")

    if stimulus.is_image:
        stim = make_image_stim(window, stimulus, image_size_deg)
        return PreparedStimulus(stimulus.stimulus_id, stimulus.text, "image", [stim])
    if mode == "sentence":
        stim = make_text_stim(window, look, stimulus.text)
        return PreparedStimulus(stimulus.stimulus_id, stimulus.text, "sentence", [stim])

    if not _is_positive_number(word_duration_s):
        raise ValueError(f"word_duration_s must be a positive number of seconds, got {word_duration_s!r}.")
    stims = [make_text_stim(window, look, word) for word in stimulus.text.split()]
    return PreparedStimulus(stimulus.stimulus_id, stimulus.text, "rsvp", stims, word_duration_s)


# Photodiode -------------------------------------------------------------------------------------------


class PhotodiodePatch:
    """A square flush in a window corner, white when on and black when off, for timing onsets."""

    def __init__(self, window: Window, settings: PhotodiodeSettings) -> None:
        from psychopy import visual

        width_pix, height_pix = (int(side) for side in window.size)
        size = settings.size_pix
        if size > min(width_pix, height_pix):
            raise ValueError(
                f"size_pix {size} is larger than the {width_pix}x{height_pix} px window. "
                "Set a smaller photodiode patch."
            )
        vertical, horizontal = settings.corner.split("_")
        x = (width_pix - size) / 2 * (1 if horizontal == "right" else -1)
        y = (height_pix - size) / 2 * (1 if vertical == "top" else -1)
        self.settings = settings
        self._squares = {
            on: visual.Rect(
                window,
                width=size,
                height=size,
                pos=(x, y),
                units="pix",
                fillColor="white" if on else "black",
                lineColor=None,
                lineWidth=0,
                autoLog=False,
            )
            for on in (True, False)
        }

    def draw(self, on: bool) -> None:
        """Draw the patch, white when ``on`` and black otherwise. The presenter picks the frames."""
        self._squares[bool(on)].draw()


# Validation helpers ----------------------------------------------------------------------------------


def _is_positive_number(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _check_color(name: str, value: object) -> None:
    """Reject a colour that is not a PsychoPy colour name or a hex RGB code such as '#ff8800'."""
    if isinstance(value, str) and HEX_COLOR_PATTERN.fullmatch(value):
        return
    if isinstance(value, str) and value.strip():
        _disable_pyglet_shadow_window()
        from psychopy.colors import colorNames

        if value.lower() in colorNames:
            return
    raise ValueError(
        f"{name} must be a PsychoPy colour name (such as 'white' or 'grey') or a hex code "
        f"such as '#ff8800', got {value!r}."
    )


def _disable_pyglet_shadow_window() -> None:
    """Stop pyglet from opening a hidden window when pyglet.gl is first imported.

    That window fails without a display, and finding a font file or checking a colour needs none.
    pyglet reads the environment variable when it is imported, and its options after that.
    """
    os.environ["PYGLET_SHADOW_WINDOW"] = "0"
    pyglet = sys.modules.get("pyglet")
    if pyglet is not None:
        pyglet.options["shadow_window"] = False
