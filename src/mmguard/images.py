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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageChops, ImageOps, UnidentifiedImageError

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
    return float(img.getextrema()[1])  # type: ignore[index, arg-type]


def _flattened(img: Image.Image, max_side: int | None, translucent: bool) -> list[Image.Image]:
    """``img`` (any mode) in RGB, reduced to ``max_side``: on white, and, when ``translucent``, also with its
    alpha dropped and on black. A large image is converted a band of rows at a time, each band reduced at once
    (Lanczos over the band and enough rows either side: the same pixels as reducing the whole): a palette or
    16-bit image converted whole took about four times an RGB image's memory (a 5 KB palette PNG of 6,324 px:
    +859 MB)."""
    high = _highest(img)

    def convert(part: Image.Image) -> list[Image.Image]:
        if not translucent:
            return [_to_rgb(part, high=high)]
        return [_to_rgb(part), part.convert("RGB"), _to_rgb(part, (0, 0, 0))]  # convert("RGB") drops the alpha

    width, height = img.size
    if max_side is None or max(width, height) <= max_side:
        return convert(img)
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    step = height / size[1]  # source rows per output row
    rows = max(1, int(_BAND_ROWS / step))  # output rows a band makes
    margin = math.ceil(3 * step) + 1  # Lanczos reads 3 output rows' worth of source rows on either side
    outs: list[Image.Image] = []
    for top in range(0, size[1], rows):
        bottom = min(size[1], top + rows)
        y0, y1 = top * step, bottom * step
        c0, c1 = max(0, math.floor(y0) - margin), min(height, math.ceil(y1) + margin)
        pieces = convert(img.crop((0, c0, width, c1)))
        outs = outs or [Image.new("RGB", size) for _ in pieces]
        for out, piece in zip(outs, pieces, strict=True):
            out.paste(piece.resize((size[0], bottom - top), Image.Resampling.LANCZOS,
                                   box=(0, y0 - c0, width, y1 - c0)), (0, top))
    return outs


def _is_translucent(img: Image.Image) -> bool:
    """Whether some pixel of ``img`` is not fully opaque (read without a copy of the image)."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return bool(img.getextrema()[-1][0] < 255)  # type: ignore[index]
    if img.mode == "P" and "transparency" in img.info:
        counts = img.histogram()[:256]
        clear = img.info["transparency"]
        if isinstance(clear, int):
            return 0 <= clear < 256 and counts[clear] > 0
        if isinstance(clear, bytes):
            return any(a < 255 and counts[i] > 0 for i, a in enumerate(clear[:256]))
    return False


def _oriented(derived: Image.Image, exif: Image.Exif) -> Image.Image:
    """``derived`` (a copy made from a decoded image) turned by that image's EXIF orientation, which a
    converted copy need not carry (TIFF tags, XMP): ``ImageOps.exif_transpose`` reads it from ``info``."""
    if exif.get(ExifTags.Base.Orientation, 1) == 1:
        return derived
    marked = derived.copy()  # never write into what may be a caller's image
    marked.info["exif"] = exif.tobytes()
    return ImageOps.exif_transpose(marked) or marked


def _is_blank(img: Image.Image) -> bool:
    """One colour all over: nothing written on it."""
    return all(low == high for low, high in img.getextrema())  # type: ignore[union-attr]


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and ImageChops.difference(a, b).getbbox() is None


def _later_frames(animation: Image.Image, first: Image.Image, limits: ImageLimits,
                  exif: Image.Exif) -> tuple[list[Image.Image], int, bool]:
    """The frames of ``animation`` after the first that differ from those before them (RGB on white, reduced as
    the first is), how many frames were decoded (the first included), and whether frames were left undecoded
    (past the limits, or unreadable). Frames are not counted first: ``n_frames`` walks the whole file (a GIF can
    hold 800,000 frames in 20 MB)."""
    width, height = animation.size
    budget = max(1, min(limits.max_frames, limits.max_frame_pixels // max(1, width * height)))
    seen = [first]
    frames: list[Image.Image] = []
    for index in range(1, budget + 1):
        try:
            animation.seek(index)
        except EOFError:  # the last frame was read
            return frames, index, False
        except Exception:  # a broken frame: the ones before it are read
            return frames, index, True
        if index == budget:  # one frame more than may be decoded: it is there, unread
            return frames, index, True
        try:
            animation.load()
            frame = animation.copy()
            frame = _to_rgb(_shrink(frame, limits.max_side)) if frame.mode in ("RGB", "L") \
                else _flattened(frame, limits.max_side, translucent=False)[0]
            frame = _oriented(frame, exif)
        except Exception:  # a frame cut short: the ones before it are read
            return frames, index, True
        if not any(_same_pixels(frame, other) for other in seen):
            seen.append(frame)
            frames.append(frame)
    return frames, budget, False


def _shrink(img: Image.Image, max_side: int | None) -> Image.Image:
    """``img`` reduced so that its longer side is at most ``max_side`` (box-reduce, then Lanczos)."""
    width, height = img.size
    if max_side is None or max(width, height) <= max_side:
        return img
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def load_image(source: Any, limits: ImageLimits = DEFAULT_LIMITS, *, allow_paths: bool = True) -> Image.Image:
    """Decode ``source`` (path, bytes, base64, data URL or PIL image) into a fully loaded RGB image, its longer
    side at most ``limits.max_side``.

    ``allow_paths=False`` refuses local file paths: a server must never read files named by a client.
    """
    data, img = _source_to_bytes(source, limits, allow_paths)
    large = False
    if data is not None:
        width, height = _peek_size(data)
        large = width * height > _LARGE_DECODE_PIXELS
    if not large:
        return _decode(data, img, limits)
    with _decode_slots:  # bounded: a burst of large images must not be decoded all at once
        try:
            return _decode(data, img, limits)
        finally:
            del data, img
            _give_memory_back()


def _peek_size(data: bytes) -> tuple[int, int]:
    """The declared size from the header only (0x0 when it cannot be read: the decode will say why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
    except Exception:
        return 0, 0


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
            f"image aspect ratio {ratio:.1f}:1 ({width}x{height}) is over the limit of {limits.max_aspect_ratio:g}:1"
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
        exif = img.getexif()
        if img.mode in _PREMULTIPLIED:  # only made in memory; Pillow converts them to nothing else
            img = img.convert(_PREMULTIPLIED[img.mode])
        if img.mode in ("RGB", "L"):  # reduced before any copy (resize reads these modes as they are)
            rgb, *others = [_to_rgb(_shrink(img, limits.max_side))]
        else:  # the alpha's colours are taken apart from it: reducing RGBA premultiplies, blanking them
            rgb, *others = _flattened(img, limits.max_side, _is_translucent(img))
        rgb = _oriented(rgb, exif)
        rgb.load()
        for view in others:
            view = _oriented(view, exif)
            if not _is_blank(view) and not any(_same_pixels(view, other) for other in (rgb, *renderings)):
                renderings.append(view)
        if rgb is source_img:
            rgb = rgb.copy()  # never alias a caller's image (the frames below move it)
        if animated:
            frames, frames_decoded, frames_unread = _later_frames(source_img, rgb, limits, exif)
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
    for view in views.renderings:
        h.update(f":{image_digest(view)}".encode())
    if views.frames_unread:
        h.update(f":unread after {views.frames_decoded}".encode())
    return h.hexdigest()
