"""Safe image loading: every input becomes one RGB ``PIL.Image`` or a clear :class:`ImageError`.

Inputs are hostile. We bound the encoded size and the pixel count *before* decoding (decompression
bombs), detect truncated or non-image data, apply EXIF orientation, take the first frame of
animations, and bring every mode (CMYK, palette, 16-bit, alpha) to 8-bit RGB. Tiling and
normalisation are left to transformers' Mllama image processor.

The model judges one rendering: the first frame, laid on white (as transformers' ``convert_to_rgb``
does). A viewer or a downstream model may be shown something else: a transparent image on a dark
background or with its alpha dropped (``Image.convert("RGB")`` drops it, so text written in the colour of
fully transparent pixels appears), or an animation's later frames. Those are kept beside the image
(:func:`other_views`) for the OCR stage to read too.

Memory is bounded too: at most :func:`max_concurrent_decodes` images are decoded at once (a 40 MP
image is ~120 MB decoded), every image is reduced to the largest canvas any Mllama model reads
(``max_side``, 2240 px: 4 tiles of 560 px) right at decode time (JPEG: already inside the decoder, via
``draft``), and after a large decode the C heap is handed back to the OS (glibc ``malloc_trim``).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import io
import math
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageChops, ImageFilter, ImageOps, ImageStat, UnidentifiedImageError

__all__ = ["ImageError", "ImageLimits", "OtherViews", "image_digest", "load_image", "max_concurrent_decodes",
           "other_views"]


class ImageError(ValueError):
    """An image cannot be used; the message says why and names the limit when one was hit."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # encoded size
    max_pixels: int = 40_000_000  # width * height before any resizing
    max_aspect_ratio: float = 64.0  # longer side / shorter side; beyond this a side vanishes when tiled
    # longer side kept after decoding: the Mllama processor never uses more (at most 4 tiles of 560 px on a
    # side), so larger images are reduced at once instead of held at full size; None keeps every pixel
    max_side: int | None = 2240
    # frames of an animation decoded (the first for the model, the others for OCR's other views), and the pixels
    # they may hold together; frames past either bound are left undecoded (OtherViews.frames_unread)
    max_frames: int = 8
    max_frame_pixels: int = 80_000_000
    # other views kept for OCR (each one more read within the image's OCR deadline); past it, frames go unread
    max_other_views: int = 8
    # False: keep none (a server whose guard reads no text with OCR: the views' decoding would be work thrown away)
    other_views: bool = True


DEFAULT_LIMITS = ImageLimits()
_NUMERIC_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # alpha-premultiplied modes and their plain forms
_BAND_ROWS = 256  # source rows converted at once when a large image must change mode before it is reduced
OTHER_VIEWS_KEY = "mmguard.other_views"  # where load_image keeps an image's OtherViews, in its ``info``


@dataclass(frozen=True)
class OtherViews:
    """What else a viewer may be shown of a loaded image than the RGB image the model judges.

    ``renderings``: a transparent image with its alpha dropped and laid on black (each kept when it differs from
    the others), then the later distinct frames of an animation, each on white. All are RGB, reduced as the image
    is. ``frames_decoded``: the animation's frames decoded, the first included (1 for a still image);
    ``frames_unread``: whether it has frames past them, left undecoded (past :class:`ImageLimits`' ``max_frames``
    or ``max_frame_pixels``, or broken)."""

    renderings: tuple[Image.Image, ...] = ()
    frames_decoded: int = 1
    frames_unread: bool = False
    # what image_digest adds for them, hashed once here: the image's digest is taken at every cache lookup
    digest: str = field(init=False, repr=False, default="")

    def __post_init__(self) -> None:
        h = hashlib.sha256()
        for view in self.renderings:
            h.update(f":{image_digest(view)}".encode())
        if self.frames_unread:
            h.update(f":unread after {self.frames_decoded}".encode())
        object.__setattr__(self, "digest", h.hexdigest() if self.renderings or self.frames_unread else "")


def other_views(image: Image.Image) -> OtherViews:
    """The :class:`OtherViews` :func:`load_image` kept with ``image`` (none for an image it did not load)."""
    views = image.info.get(OTHER_VIEWS_KEY)
    return views if isinstance(views, OtherViews) else OtherViews()
_LARGE_DECODE_PIXELS = 4_000_000  # after decoding more than this, give freed memory back to the OS
_decode_slots = threading.BoundedSemaphore(2)
_decode_slots_size = 2


def max_concurrent_decodes(n: int | None = None) -> int:
    """Images decoded at once in this process (default 2; others wait). Set with ``n``; returns the value."""
    global _decode_slots, _decode_slots_size
    if n is not None:
        if n < 1:
            raise ValueError(f"max_concurrent_decodes must be at least 1, got {n}")
        _decode_slots, _decode_slots_size = threading.BoundedSemaphore(n), n
    return _decode_slots_size


def _load_malloc_trim() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def _give_memory_back() -> None:
    # Pillow decodes into 16 MB blocks that glibc serves from its arenas and keeps after free: without a
    # trim, a burst of large images leaves gigabytes resident
    if _malloc_trim is not None:
        _malloc_trim(0)
_DATA_URL_RE = re.compile(
    r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I
)
_B64_RE = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")


def _decode_base64(data: str, what: str, limits: ImageLimits) -> bytes:
    # base64 inflates by 4/3: reject before decoding a huge string
    if len(data) > limits.max_bytes * 4 // 3 + 8:
        raise ImageError(f"{what} is larger than the limit of {limits.max_bytes} bytes")
    compact = "".join(data.split()).translate(str.maketrans("-_", "+/"))  # accept the URL-safe alphabet too
    compact += "=" * (-len(compact) % 4)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"{what} is not valid base64: {err}") from None


def _source_to_bytes(
    source: Any, limits: ImageLimits, allow_paths: bool = True
) -> tuple[bytes | None, Image.Image | None]:
    if isinstance(source, Image.Image):
        return None, source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    if isinstance(source, Path):
        if not allow_paths:
            raise ImageError("local file paths are not accepted here; send the image as a data URL or base64")
        return _read_file(source, limits), None
    if isinstance(source, str):
        text = source.strip()
        if not text:
            raise ImageError("image source is an empty string")
        m = _DATA_URL_RE.match(text[:512])
        if m:
            payload = text[m.end() :]
            mime = (m.group("mime") or "").lower()
            if mime and not mime.startswith("image/"):
                raise ImageError(f"data URL has media type {mime!r}, expected image/*")
            if not m.group("b64"):
                raise ImageError("data URL must be base64-encoded (';base64,')")
            return _decode_base64(payload, "data URL", limits), None
        if text.lower().startswith(("http://", "https://")):
            raise ImageError("remote image URLs are not fetched here; download the image or pass a data URL")
        if len(text) < 4096 and allow_paths and _is_existing_path(text):
            return _read_file(Path(text).expanduser(), limits), None
        if len(text) >= 64 and _B64_RE.match(text[:4096]):
            return _decode_base64(text, "base64 image", limits), None
        raise ImageError(f"image not found: {text[:200]!r} is neither an existing file, a data URL nor base64")
    raise ImageError(f"unsupported image source of type {type(source).__name__}")


def _is_existing_path(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError):  # name too long, NUL bytes: not a path
        return False


def _read_file(path: Path, limits: ImageLimits) -> bytes:
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ImageError(f"image file {path} has {size} bytes, over the limit of {limits.max_bytes}")
    return path.read_bytes()


def _to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255),
            high: float | None = None) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited on ``background`` (white: what a viewer shows).
    ``high``: the largest value of the whole image of integer or float data (when ``img`` is a band of it)."""
    if img.mode == "RGB":
        return img
    if img.mode in _NUMERIC_MODES:
        arr = np.array(img, dtype=np.float32)  # a copy: scaled in place below
        hi = high if high is not None else (float(arr.max()) if arr.size else 0.0)
        if hi > 255:  # 16-bit or float data: scale the real range to 8 bits
            arr *= 255.0 / (65535.0 if hi <= 65535 else hi)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        underneath = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(underneath, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _highest(img: Image.Image) -> float | None:
    """The largest value of an image of integer or float data (read without a copy); None for other modes."""
    if img.mode not in _NUMERIC_MODES:
        return None
    try:
        return float(img.getextrema()[1])  # type: ignore[index, arg-type]
    except ValueError:  # I;16B, I;16L, I;16N: Pillow computes no extrema for them (big-endian 16-bit TIFFs)
        return float(np.asarray(img).max()) if img.width and img.height else 0.0


def _flattened(img: Image.Image, max_side: int | None, translucent: bool) -> list[Image.Image]:
    """``img`` (any mode) in RGB, reduced to ``max_side``: on white, and, when ``translucent``, also with its
    alpha dropped, on black, and its alpha (mode L). A large image is converted a band of rows at a time, each
    band reduced at once (Lanczos over the band and enough rows either side: the same pixels as reducing the
    whole, up to rounding): a palette or 16-bit image converted whole took about four times an RGB image's memory
    (a 5 KB palette PNG of 6,324 px: +859 MB)."""
    high = _highest(img)

    def convert(part: Image.Image) -> list[Image.Image]:
        if not translucent:
            return [_to_rgb(part, high=high)]
        rgba = part.convert("RGBA")  # a palette's or a colour key's transparency applied
        on_black = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        # on white as the model sees it; the alpha dropped (convert("RGB") drops it); on black; the alpha itself
        return [_to_rgb(part), part.convert("RGB"), on_black, rgba.getchannel("A")]

    width, height = img.size
    size = _reduced_size(img, max_side)
    if size is None:
        return convert(img)
    step = height / size[1]  # source rows per output row
    rows = max(1, int(_BAND_ROWS / step))  # output rows a band makes
    margin = math.ceil(3 * step) + 1  # Lanczos reads 3 output rows' worth of source rows on either side
    outs: list[Image.Image] = []
    for top in range(0, size[1], rows):
        bottom = min(size[1], top + rows)
        y0, y1 = top * step, bottom * step
        c0, c1 = max(0, math.floor(y0) - margin), min(height, math.ceil(y1) + margin)
        pieces = convert(img.crop((0, c0, width, c1)))
        outs = outs or [Image.new(piece.mode, size) for piece in pieces]
        for out, piece in zip(outs, pieces, strict=True):
            out.paste(_lanczos(piece, (size[0], bottom - top), (y0 - c0, y1 - c0)), (0, top))
    return outs


def _is_translucent(img: Image.Image) -> bool:
    """Whether some pixel of ``img`` is not fully opaque (read without a copy of the image)."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return bool(img.getextrema()[-1][0] < 255)  # type: ignore[index]
    if img.mode in ("RGB", "L") and "transparency" in img.info:  # a colour key: viewers show it as clear
        return True
    if img.mode == "P" and "transparency" in img.info:
        counts = img.histogram()[:256]
        clear = img.info["transparency"]
        if isinstance(clear, int):
            return 0 <= clear < 256 and counts[clear] > 0
        if isinstance(clear, bytes):
            return any(a < 255 and counts[i] > 0 for i, a in enumerate(clear[:256]))
    return False


def _orientation(img: Image.Image) -> bytes | None:
    """``img``'s EXIF orientation as the bytes of an EXIF block that holds it alone (None when upright). The views
    made from ``img`` are turned by it (:func:`_oriented`): a converted copy need not carry the tag (TIFF tags,
    XMP), and re-serialising the whole EXIF block for every view and frame cost seconds (59,000 tags)."""
    orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation == 1:
        return None
    alone = Image.Exif()
    alone[ExifTags.Base.Orientation] = orientation
    return alone.tobytes()


def _oriented(derived: Image.Image, orientation: bytes | None) -> Image.Image:
    """``derived`` turned upright by :func:`_orientation`'s EXIF block (``ImageOps.exif_transpose`` reads it)."""
    if orientation is None:
        return derived
    marked = derived.copy()  # never write into what may be a caller's image
    marked.info["exif"] = orientation
    return ImageOps.exif_transpose(marked) or marked


def _is_blank(img: Image.Image) -> bool:
    """One colour all over: nothing written on it."""
    return all(low == high for low, high in img.getextrema())  # type: ignore[union-attr]


def _viewer_views(dropped: Image.Image, on_black: Image.Image, alpha: Image.Image) -> list[Image.Image]:
    """What a translucent image shows other than on white, where that depends on the background: with its alpha
    dropped (kept only when the colours under its clear pixels vary: a uniform colour there hides nothing) and on
    black. Pixels far from any clear one look the same on any background (the white view has them) and are laid
    flat black: a screenshot with clear rounded corners and shadow was read twice over, its window's text too."""
    clear = alpha.point(lambda a: 255 if a < 250 else 0)
    if clear.getbbox() is None:
        return []
    # pixels within about 8-16 px of a clear one (a stroke of white text on clear is; a window's inside is not)
    block = 8
    small = clear.reduce(block).point(lambda v: 255 if v else 0).filter(ImageFilter.MaxFilter(3))
    near = small.resize(clear.size, Image.Resampling.NEAREST)
    flat = Image.new("RGB", clear.size, (0, 0, 0))
    views = []
    under = ImageStat.Stat(dropped, mask=clear).extrema
    if any(high - low > 8 for low, high in under):
        views.append(Image.composite(dropped, flat, near))
    views.append(Image.composite(on_black, flat, near))
    return views


def _is_new(view: Image.Image, seen: list[Image.Image]) -> bool:
    """Whether ``view`` is worth reading: not one colour all over, and unlike every view in ``seen``."""
    return not _is_blank(view) and not any(_same_pixels(view, other) for other in seen)


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a, b).getbbox() is None


def _later_frames(animation: Image.Image, seen: list[Image.Image], limits: ImageLimits,
                  orientation: bytes | None) -> tuple[list[Image.Image], int, bool]:
    """The views of ``animation``'s frames after the first that differ from ``seen`` (and each other): each frame
    on white and, when translucent, its :func:`_viewer_views`, reduced as the first is. Also how many frames were
    decoded (the first included), and whether frames were left undecoded (past the limits, or unreadable).

    Each frame is bounded by its own size (TIFF pages and MPO pictures each have one: a 64 px first page hid
    100 MP pages) against ``max_pixels``, the aspect ratio and what is left of ``max_frame_pixels``. Frames are not
    counted first: ``n_frames`` walks the whole file (a GIF can hold 800,000 frames in 20 MB)."""
    left = limits.max_frame_pixels - animation.size[0] * animation.size[1]
    views: list[Image.Image] = []
    for index in range(1, limits.max_frames + 1):
        try:
            with warnings.catch_warnings():  # a page over Pillow's bomb size: refused below, by the limits
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                animation.seek(index)
        except EOFError:  # the last frame was read
            return views, index, False
        except Exception:  # a broken frame: the ones before it are read
            return views, index, True
        width, height = animation.size
        if index == limits.max_frames or not _frame_fits(width, height, left, limits):
            return views, index, True  # a frame more than may be decoded: it is there, unread
        left -= width * height
        try:
            if limits.max_side is not None and animation.format in ("JPEG", "MPO"):
                animation.draft("RGB", (limits.max_side, limits.max_side))
            animation.load()
            frame = animation.copy()
            if frame.mode in _PREMULTIPLIED:
                frame = frame.convert(_PREMULTIPLIED[frame.mode])
            translucent = _is_translucent(frame)
            on_white, *others = _flattened(frame, limits.max_side, translucent)
            shown = [on_white, *(_viewer_views(*others) if translucent else [])]
            shown = [_oriented(view, orientation) for view in shown]
        except Exception:  # a frame cut short: the ones before it are read
            return views, index, True
        for view in shown:
            if _is_new(view, seen):
                if len(seen) > limits.max_other_views:  # seen holds the image itself too
                    return views, index, True
                seen.append(view)
                views.append(view)
    return views, limits.max_frames, False


def _frame_fits(width: int, height: int, left: int, limits: ImageLimits) -> bool:
    return (width > 0 and height > 0 and width * height <= min(left, limits.max_pixels)
            and max(width, height) / min(width, height) <= limits.max_aspect_ratio)


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` reduced so that its longer side is at most ``max_side`` (Lanczos, as :func:`_flattened` reduces: the
    same pixels saved as RGB or as RGBA give the same image; a box-reduce first made them differ by up to 12 levels
    at reductions of 6 or more)."""
    size = _reduced_size(img, max_side)
    return img if size is None else _lanczos(img, size)


def _reduced_size(img: Image.Image, max_side: int | None) -> tuple[int, int] | None:
    """The size of ``img`` with its longer side brought to ``max_side``; None when it is no longer already."""
    width, height = img.size
    if max_side is None or max(width, height) <= max_side:
        return None
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _lanczos(img: Image.Image, size: tuple[int, int], rows: tuple[float, float] | None = None) -> Image.Image:
    """``img`` (its ``rows`` span, all of it by default) resized to ``size`` by Lanczos, rows first, then columns:
    one order for a whole image and for its bands. Pillow picks the order of its two 8-bit passes itself, and the
    two orders round differently (13 levels apart on black text reduced 20 times), so a band of a converted image
    and the same image reduced whole differed."""
    top, bottom = rows if rows is not None else (0.0, float(img.height))
    tall = img.resize((img.width, size[1]), Image.Resampling.LANCZOS, box=(0, top, img.width, bottom))
    return tall.resize(size, Image.Resampling.LANCZOS)


def load_image(source: Any, limits: ImageLimits = DEFAULT_LIMITS, *, allow_paths: bool = True) -> Image.Image:
    """Decode ``source`` (path, bytes, base64, data URL or PIL image) into a fully loaded RGB image, its longer
    side at most ``limits.max_side``.

    ``allow_paths=False`` refuses local file paths: a server must never read files named by a client.
    """
    data, img = _source_to_bytes(source, limits, allow_paths)
    large = False
    if data is not None:
        width, height, animated = _peek(data)
        # an animation's later frames may be larger than its first (TIFF pages, MPO pictures): it takes a slot
        large = width * height > _LARGE_DECODE_PIXELS or animated
    if not large:
        return _decode(data, img, limits)
    with _decode_slots:  # bounded: a burst of large images must not be decoded all at once
        try:
            return _decode(data, img, limits)
        finally:
            del data, img
            _give_memory_back()


def _peek(data: bytes) -> tuple[int, int, bool]:
    """The declared size from the header only, and whether the image has more frames than one (0x0 when it cannot
    be read: the decode will say why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size[0], probe.size[1], bool(getattr(probe, "is_animated", False))
    except Exception:
        return 0, 0, False


def _decode(data: bytes | None, img: Image.Image | None, limits: ImageLimits) -> Image.Image:
    if data is not None:
        if len(data) == 0:
            raise ImageError("image data is empty (0 bytes)")
        if len(data) > limits.max_bytes:
            raise ImageError(f"image has {len(data)} bytes, over the limit of {limits.max_bytes}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError("data is not a recognised image format") from None
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
            raise ImageError(f"image rejected as a decompression bomb: {err}") from None
        except Exception as err:  # corrupt headers raise assorted errors inside PIL plugins
            raise ImageError(f"cannot open image: {err}") from None
    assert img is not None
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image has {width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels}"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageError(
            f"image aspect ratio {ratio:.2f}:1 ({width}x{height}) is over the limit of {limits.max_aspect_ratio:g}:1"
        )
    source_img = img
    renderings: list[Image.Image] = []
    frames_decoded, frames_unread = 1, False
    try:
        animated = bool(getattr(img, "is_animated", False))
        if animated:
            img.seek(0)  # the first frame is what a viewer shows first
        if limits.max_side is not None and img.format == "JPEG":
            img.draft("RGB", (limits.max_side, limits.max_side))  # the decoder itself scales by 1/2, 1/4, 1/8
        img.load()
        orientation = _orientation(img)
        if img.mode in _PREMULTIPLIED:  # only made in memory; Pillow converts them to nothing else
            img = img.convert(_PREMULTIPLIED[img.mode])
        translucent = limits.other_views and _is_translucent(img)
        if img.mode in ("RGB", "L") and not translucent:  # reduced before any copy (resize reads them as they are)
            rgb, *others = [_to_rgb(_shrink(img, limits.max_side))]
        else:  # the alpha's colours are taken apart from it: reducing RGBA premultiplies, blanking them
            rgb, *others = _flattened(img, limits.max_side, translucent)
        rgb = _oriented(rgb, orientation)
        rgb.load()
        for view in (_viewer_views(*others) if translucent else []):
            view = _oriented(view, orientation)
            if _is_new(view, [rgb, *renderings]):
                renderings.append(view)
        if rgb is source_img:
            rgb = rgb.copy()  # never alias a caller's image (the frames below move it)
        if animated and limits.other_views:
            frames, frames_decoded, frames_unread = _later_frames(source_img, [rgb, *renderings], limits,
                                                                  orientation)
            renderings.extend(frames)
            source_img.seek(0)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise ImageError(f"image rejected as a decompression bomb: {err}") from None
    except OSError as err:
        raise ImageError(f"image is truncated or corrupt: {err}") from None
    except Exception as err:
        raise ImageError(f"cannot decode image: {err}") from None
    if data is not None and source_img is not rgb:
        source_img.close()  # the full-size decode: free it now, not at the next garbage collection
    if renderings or frames_unread:
        rgb.info[OTHER_VIEWS_KEY] = OtherViews(tuple(renderings), frames_decoded, frames_unread)
    return rgb


def image_digest(img: Image.Image) -> str:
    """Content hash of decoded pixels (used to reuse image encodings and as a cache key)."""
    h = hashlib.sha256()
    h.update(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    views = other_views(img)  # two images alike on white may hide different text: they must not share a key
    if views.digest:
        h.update(f":{views.digest}".encode())
    return h.hexdigest()
