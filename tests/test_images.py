"""Hostile images: every one gets a verdict or a clear error naming the limit, never a crash."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from mmguard import Conversation, ImageError, ImageLimits, load_image


def png_bytes(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


RED = Image.new("RGB", (40, 30), (255, 0, 0))


def test_sources_path_bytes_base64_data_url_pil(tmp_path) -> None:
    data = png_bytes(RED)
    path = tmp_path / "red.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for src in (path, str(path), data, b64, f"data:image/png;base64,{b64}", RED):
        img = load_image(src)
        assert img.mode == "RGB" and img.size == (40, 30) and img.getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_applied() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = load_image(png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "LA", "RGBA", "P", "I;16", "I", "F", "YCbCr", "La", "RGBa"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    if mode in ("I;16", "I", "F"):
        arr = (np.linspace(0, 1, 32 * 16).reshape(16, 32) * (60000 if mode != "F" else 1.0))
        img = Image.fromarray(arr.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        img = img if img.mode == mode else img.convert(mode)
    else:
        img = RED.convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == img.size


def test_transparency_composited_on_white() -> None:
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(png_bytes(img)).getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert load_image(png_bytes(pal)).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = load_image(buf.getvalue())
    r, g, b = out.getpixel((5, 5))
    assert r > 200 and g < 50 and b < 50


def test_decompression_bomb_rejected_before_decoding() -> None:
    bomb = png_bytes(Image.new("1", (12000, 12000)))  # 144 Mpx that compresses to a few kB
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match=r"pixels|bomb"):
        load_image(bomb)
    with pytest.raises(ImageError, match="limit of 1000"):
        load_image(RED, ImageLimits(max_pixels=1000))


def test_truncated_empty_wrong_type_and_oversized() -> None:
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match=r"truncated|corrupt|cannot"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(b"%PDF-1.4 definitely not an image" * 4)
    with pytest.raises(ImageError, match="over the limit of 100"):
        load_image(data, ImageLimits(max_bytes=100))
    with pytest.raises(ImageError, match="aspect ratio"):
        load_image(Image.new("RGB", (6500, 10)))
    with pytest.raises(ImageError, match=r"aspect ratio 64\.03:1 \(2241x35\) is over the limit of 64:1"):
        load_image(Image.new("RGB", (2241, 35)))  # said '64.0:1 ... over the limit of 64:1'
    with pytest.raises(ImageError, match="media type"):
        load_image("data:text/plain;base64,aGVsbG8=")
    with pytest.raises(ImageError, match=r"not valid base64|not a recognised"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(ImageError, match=r"not found|neither"):
        load_image("/no/such/file.png")
    with pytest.raises(ImageError, match="remote"):
        load_image("https://example.com/x.png")


def test_paths_can_be_refused(tmp_path) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes(RED))
    assert load_image(str(path)).size == (40, 30)
    with pytest.raises(ImageError, match="local file paths are not accepted"):
        load_image(path, allow_paths=False)
    with pytest.raises(ImageError, match="neither an existing file"):
        load_image(str(path), allow_paths=False)
    parts = [{"type": "text", "text": "x"}, {"type": "image", "path": str(path)}]
    msg = {"messages": [{"role": "user", "content": parts}]}
    assert Conversation.from_messages(msg).has_image
    with pytest.raises(ImageError):
        Conversation.from_messages(msg, allow_paths=False)


def test_conversation_rules() -> None:
    from mmguard import ConversationError

    with pytest.raises(ConversationError, match="alternate"):
        Conversation.from_turns([("agent", "hi")])
    with pytest.raises(ConversationError, match="alternate"):
        Conversation.from_turns([("user", "a"), ("user", "b")])
    with pytest.raises(ConversationError, match="at most one image"):
        Conversation.from_messages({"messages": [{"role": "user", "content": [
            {"type": "image", "image": RED}, {"type": "image", "image": RED}, {"type": "text", "text": "x"}]}]})
    with pytest.raises(ConversationError, match="role 'system'"):
        Conversation.from_messages([{"role": "system", "content": "x"}])
    with pytest.raises(ConversationError, match="only user turns"):
        Conversation.from_turns([("user", "a"), ("agent", "b")], image=RED, image_turn=1)
    conv = Conversation.from_messages([{"role": "user", "content": [{"type": "image", "image": RED}]}])
    assert conv.has_image and conv.task == "prompt"


@pytest.mark.parametrize("size", [(1, 1), (4000, 100), (100, 4000), (560, 560), (1123, 1121), (7, 300)])
def test_odd_sizes_get_a_verdict(tiny_guard, size) -> None:
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    verdict = tiny_guard.classify(Conversation.prompt("what is this?", img))
    assert 0.0 <= verdict.unsafe_probability <= 1.0 and verdict.has_image


def test_large_images_are_reduced_to_the_largest_canvas_at_decode() -> None:
    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.new("RGB", (4500, 1500), (10, 200, 30)).save(buf, fmt)
        img = load_image(buf.getvalue())
        assert img.size == (2240, 747) and img.mode == "RGB", (fmt, img.size)
    small = load_image(buf.getvalue(), ImageLimits(max_side=None))
    assert small.size == (4500, 1500)  # max_side=None keeps every pixel


def test_max_concurrent_decodes_is_settable() -> None:
    from mmguard.images import max_concurrent_decodes

    default = max_concurrent_decodes()
    try:
        assert max_concurrent_decodes(3) == 3
        with pytest.raises(ValueError, match="at least 1"):
            max_concurrent_decodes(0)
    finally:
        max_concurrent_decodes(default)


# -- large images that must change mode before they are reduced -------------------------------------------------
@pytest.mark.parametrize("mode", ["P", "PA", "I;16", "I", "F", "CMYK", "1", "LA", "RGBA", "YCbCr"])
def test_a_large_image_of_every_mode_is_reduced_band_by_band_as_if_whole(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmguard import images

    monkeypatch.setattr(images, "_BAND_ROWS", 16)  # many bands, each with its margin
    rng = np.random.default_rng(1)
    if mode in ("I;16", "I", "F"):
        arr = rng.integers(0, 60000, (300, 220)).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode])
        img = Image.fromarray(arr)
        img = img if img.mode == mode else img.convert(mode)
    else:
        img = Image.fromarray(rng.integers(0, 256, (300, 220, 3), dtype=np.uint8), "RGB").convert(
            "RGBA" if mode in ("RGBA", "LA", "PA") else "RGB")
        if img.mode == "RGBA":
            img.putalpha(255)  # opaque: the model's view only
        img = img.convert(mode)
    out = load_image(img, ImageLimits(max_side=100))
    assert out.mode == "RGB" and out.size == (73, 100)
    whole = images._shrink(images._to_rgb(img), 100)  # converted whole, then reduced as an RGB image is
    assert np.abs(np.asarray(out, int) - np.asarray(whole, int)).max() <= 1


def test_the_same_pixels_as_rgb_or_opaque_rgba_give_the_same_image() -> None:
    # Pillow picks the order of its two 8-bit passes itself, and the orders round differently: black text reduced
    # 20 times as RGB (whole) and as RGBA (in bands) differed by 13 levels (an audit)
    from PIL import ImageDraw, ImageFont

    page = Image.new("RGB", (700, 11200), "white")
    draw = ImageDraw.Draw(page)
    for y in range(0, 11200, 70):
        draw.text((5, y), "WORDS " * 60, fill="black", font=ImageFont.load_default(size=60))
    as_rgb = np.asarray(load_image(png_bytes(page), ImageLimits(max_side=560)), int)
    as_rgba = np.asarray(load_image(png_bytes(page.convert("RGBA")), ImageLimits(max_side=560)), int)
    assert as_rgb.shape == as_rgba.shape == (560, 35, 3)
    assert np.abs(as_rgb - as_rgba).max() <= 1


def test_a_small_palette_png_of_many_pixels_decodes_in_little_memory() -> None:
    # a 5 KB palette PNG of 6,324 px took +859 MB to decode (converted whole to RGBA, then composited) and a
    # 16-bit one +731 MB (as float64); measured apart, in a fresh process, by its peak resident size
    import subprocess
    import sys

    script = """
import io, resource, sys
import numpy as np
from PIL import Image
side = 6324
if sys.argv[1] == "palette":
    img = Image.new("P", (side, side), 0)
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    save = {"transparency": 0}
else:
    img = Image.fromarray(np.full((side, side), 40000, np.uint16))
    save = {}
buf = io.BytesIO()
img.save(buf, "PNG", **save)
data = buf.getvalue()
del img
from mmguard.images import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = load_image(data)
print(len(data), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, out.size)
"""
    for kind in ("palette", "16-bit"):
        done = subprocess.run([sys.executable, "-c", script, kind], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        size, grown_mb, _ = done.stdout.split(maxsplit=2)
        assert int(size) < 100_000 and int(grown_mb) < 300, (kind, done.stdout)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16N"])
def test_16_bit_images_of_either_byte_order_load(mode: str) -> None:
    # Pillow computes no extrema for these modes (a big-endian 16-bit TIFF opens as I;16B): they were refused
    values = (np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16)
    img = Image.frombytes(mode, (64, 32), values.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    for limits in (ImageLimits(), ImageLimits(max_side=20)):
        out = load_image(img, limits)
        assert out.mode == "RGB" and out.getpixel((out.width - 1, out.height - 1))[0] > 200
