"""Tests for minigpt4_local.image: preprocessing numerics, odd-but-valid inputs, bad inputs, input expansion.

The preprocessing reference is computed independently here in float64 numpy from docs/numerics.md §2
(PIL bicubic resize -> /255 -> (x - mean) / std); the module computes in float32 like torchvision,
so the tolerance is 1e-6 absolute (measured max diff ~2.4e-7).
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from support.images import (
    gradient_rgb,
    write_animated_gif,
    write_exif_rotated_jpeg,
    write_gray16_png,
    write_image,
    write_png_bomb,
    write_text_file,
    write_truncated,
)

from minigpt4_local import image as image_mod
from minigpt4_local.config import CLIP_MEAN, CLIP_STD
from minigpt4_local.errors import ImageError
from minigpt4_local.image import (
    expand_image_inputs,
    is_image_path,
    load_and_preprocess,
    load_image,
    preprocess,
)

MEAN64 = np.array(CLIP_MEAN, dtype=np.float64)
STD64 = np.array(CLIP_STD, dtype=np.float64)


def reference_pixels(image: Image.Image, size: int) -> np.ndarray:
    """Spec section 8, written out independently: (3, S, S) float64."""
    resized = image.convert("RGB").resize((size, size), resample=Image.BICUBIC)
    hwc = np.asarray(resized).astype(np.float64) / 255.0
    return ((hwc - MEAN64) / STD64).transpose(2, 0, 1)


def assert_one_line_error(
    err: pytest.ExceptionInfo[ImageError], path: os.PathLike | str, *words: str
) -> None:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    assert os.fspath(path) in message
    for word in words:
        assert word.lower() in message.lower(), message


# ----------------------------------------------------------------------------------------------
# Preprocessing numerics
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [56, 224])
@pytest.mark.parametrize("wh", [(1, 1), (37, 53), (300, 200), (1, 4000), (224, 224)])
def test_preprocess_matches_independent_reference(wh: tuple[int, int], size: int) -> None:
    img = gradient_rgb(*wh, seed=wh[0] + wh[1])
    got = preprocess([img], size)
    want = reference_pixels(img, size)
    assert got.shape == (1, 3, size, size)
    assert got.dtype == np.float32 and got.flags["C_CONTIGUOUS"]
    assert np.abs(got[0].astype(np.float64) - want).max() <= 1e-6


def test_preprocess_uses_float32_torchvision_arithmetic() -> None:
    # ToTensor (uint8 -> float32 / 255) then Normalize (float32 sub, div): bit-identical in numpy float32.
    img = gradient_rgb(64, 48, seed=3)
    hwc = np.asarray(img.resize((56, 56), Image.BICUBIC)).astype(np.float32) / np.float32(255)
    want = ((hwc - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1)
    np.testing.assert_array_equal(preprocess([img], 56)[0], want)


def test_preprocess_is_rgb_chw_order() -> None:
    red = Image.new("RGB", (30, 20), (255, 0, 0))
    out = preprocess([red], 56)[0]  # (3, S, S)
    expected = [(1 - CLIP_MEAN[0]) / CLIP_STD[0], -CLIP_MEAN[1] / CLIP_STD[1], -CLIP_MEAN[2] / CLIP_STD[2]]
    for channel, value in enumerate(expected):
        np.testing.assert_allclose(out[channel], value, atol=1e-6)
    assert out[0].min() > 1.5 and out[1].max() < -1.5 and out[2].max() < -1.4


def test_preprocess_resize_is_antialiased_bicubic() -> None:
    # A 1-pixel checkerboard shrunk 8x must average to flat gray with PIL's antialiased filter; a
    # point-sampling cubic (OpenCV INTER_CUBIC style) would keep the extremes.
    board = ((np.indices((448, 448)).sum(axis=0) % 2) * 255).astype(np.uint8)
    out = preprocess([Image.fromarray(board).convert("RGB")], 56)[0]
    gray = out[0] * CLIP_STD[0] + CLIP_MEAN[0]  # back to [0, 1]
    assert abs(float(gray.mean()) - 0.5) < 0.01 and float(gray.std()) < 0.01


def test_preprocess_batch_order_custom_stats_and_empty() -> None:
    imgs = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    out = preprocess(imgs, 28, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.shape == (3, 3, 28, 28)
    for i in range(3):
        assert out[i, i].min() == pytest.approx(1.0) and out[i].sum(axis=(1, 2)).argmax() == i
    assert preprocess([], 28).shape == (0, 3, 28, 28)
    with pytest.raises(ValueError):
        preprocess(imgs, 0)


def test_preprocess_converts_non_rgb_input() -> None:
    gray = Image.new("L", (10, 10), 128)
    np.testing.assert_allclose(preprocess([gray], 28), preprocess([gray.convert("RGB")], 28), atol=0)


def test_load_and_preprocess(tmp_path: Path) -> None:
    paths = [write_image(tmp_path / f"{i}.png", gradient_rgb(40 + i, 30, seed=i)) for i in range(2)]
    out = load_and_preprocess(paths, 56, CLIP_MEAN, CLIP_STD)
    want = np.stack([reference_pixels(Image.open(p), 56) for p in paths])
    assert out.shape == (2, 3, 56, 56) and out.dtype == np.float32
    assert np.abs(out - want).max() <= 1e-6


# ----------------------------------------------------------------------------------------------
# Odd but valid inputs
# ----------------------------------------------------------------------------------------------


def _p_with_byte_transparency(path: Path) -> Path:
    p = Image.new("P", (20, 10), 1)
    p.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    return write_image(path, p, "PNG", transparency=bytes([0, 0, 255]))


ODD_FILES = {
    "gray_L.png": lambda p: write_image(p, Image.new("L", (20, 10), 77)),
    "gray_LA.png": lambda p: write_image(p, Image.new("LA", (20, 10), (77, 0))),
    "rgba.png": lambda p: write_image(p, Image.new("RGBA", (20, 10), (10, 20, 30, 0))),
    "palette.png": lambda p: write_image(p, Image.new("RGB", (20, 10), (200, 0, 0)).convert("P")),
    "palette_trns_int.png": lambda p: write_image(p, Image.new("P", (20, 10), 3), "PNG", transparency=3),
    "palette_trns_bytes.png": _p_with_byte_transparency,
    "cmyk.jpg": lambda p: write_image(p, Image.new("CMYK", (20, 10), (0, 255, 255, 0))),
    "cmyk.tiff": lambda p: write_image(p, Image.new("CMYK", (20, 10), (0, 255, 255, 0))),
    "bilevel.png": lambda p: write_image(p, Image.new("1", (20, 10), 1)),
    "gray16.png": lambda p: write_gray16_png(p, 20, 10, 32768),
    "int32.tiff": lambda p: write_image(p, Image.fromarray(np.full((10, 20), 40000, np.int32))),
    "float32.tiff": lambda p: write_image(p, Image.fromarray(np.full((10, 20), 0.5, np.float32))),
    "animated.gif": lambda p: write_animated_gif(p, 20, 10, [(255, 0, 0), (0, 0, 255), (0, 255, 0)]),
    "photo.webp": lambda p: write_image(p, gradient_rgb(20, 10)),
    "photo.bmp": lambda p: write_image(p, gradient_rgb(20, 10)),
    "one_pixel.png": lambda p: write_image(p, Image.new("RGB", (1, 1), (1, 2, 3))),
    "thin.png": lambda p: write_image(p, gradient_rgb(1, 4000)),
    "no_extension": lambda p: write_image(p, gradient_rgb(20, 10), "PNG"),
}

ODD_SIZES = {"one_pixel.png": (1, 1), "thin.png": (1, 4000)}


@pytest.mark.parametrize("name", sorted(ODD_FILES))
def test_odd_but_valid_files_load_as_rgb(tmp_path: Path, name: str) -> None:
    path = ODD_FILES[name](tmp_path / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading must not spray warnings at CLI users
        img = load_image(path)
    assert img.mode == "RGB"
    assert img.size == ODD_SIZES.get(name, (20, 10))
    assert np.asarray(img).shape == (*img.size[::-1], 3)
    assert preprocess([img], 28).shape == (1, 3, 28, 28)


@pytest.mark.parametrize(
    ("name", "rgb"),
    [
        ("gray_L.png", (77, 77, 77)),
        ("rgba.png", (10, 20, 30)),  # alpha dropped, colour kept: the original's plain convert("RGB")
        ("cmyk.jpg", (255, 0, 0)),
        ("bilevel.png", (255, 255, 255)),
        ("animated.gif", (255, 0, 0)),  # first frame
        ("one_pixel.png", (1, 2, 3)),
    ],
)
def test_odd_files_pixel_values(tmp_path: Path, name: str, rgb: tuple[int, int, int]) -> None:
    img = load_image(ODD_FILES[name](tmp_path / name))
    pixels = np.asarray(img).reshape(-1, 3).astype(int)
    assert np.abs(pixels - np.array(rgb)).max() <= 2


@pytest.mark.parametrize(
    ("name", "gray"),
    [
        ("gray16.png", 128),  # 32768 / 65535 of full scale, not clipped to 255
        ("int32.tiff", round(40000 / 257)),  # mode I within 0..65535 is read as 16-bit
        ("float32.tiff", 128),  # mode F within [0, 1]
    ],
)
def test_wide_modes_are_scaled_not_clipped(tmp_path: Path, name: str, gray: int) -> None:
    img = load_image(ODD_FILES[name](tmp_path / name))
    pixels = np.asarray(img).astype(int)
    assert np.abs(pixels - gray).max() <= 1, pixels[0, 0]


def test_gray16_full_range_maps_to_full_8bit_range(tmp_path: Path) -> None:
    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    path = write_image(tmp_path / "ramp16.png", Image.fromarray(ramp))
    assert Image.open(path).mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(load_image(path))[0, :, 0], [0, 1, 128, 255])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = write_exif_rotated_jpeg(tmp_path / "rot.jpg", 40, 20, orientation=6)
    assert Image.open(path).size == (40, 20)
    assert load_image(path).size == (20, 40)
    # Content check: stored left half red, right half blue; orientation 6 puts stored column 0 on top.
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "halves.jpg", exif=exif.tobytes(), quality=95)
    shown = np.asarray(load_image(tmp_path / "halves.jpg")).astype(int)  # (40, 20, 3)
    assert shown.shape == (40, 20, 3)
    assert shown[:15, :, 0].min() > 200 and shown[:15, :, 2].max() < 60
    assert shown[25:, :, 2].min() > 200 and shown[25:, :, 0].max() < 60


def test_loaded_image_is_detached_from_file(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", gradient_rgb(16, 16))
    img = load_image(path)
    path.unlink()
    assert np.asarray(img).shape == (16, 16, 3)


# ----------------------------------------------------------------------------------------------
# Bad inputs: always ImageError with one line naming the path, never a hang
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert_one_line_error(err, path, "no such file")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as err:
        load_image(tmp_path)
    assert_one_line_error(err, tmp_path, "directory")


def _call_with_timeout(fn, timeout_s: float = 5.0):
    """Run fn in a daemon thread; fail (instead of hanging the suite) if it does not return in time."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return thread.is_alive(), result


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    try:
        hung, result = _call_with_timeout(lambda: load_image(fifo))
    finally:
        # If a regression left a reader blocked in open(), opening the write end releases it.
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not hung, "load_image blocked on a FIFO"
    assert isinstance(result.get("error"), ImageError), result
    message = str(result["error"])
    assert "\n" not in message and str(fifo) in message and "fifo" in message.lower()


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_device_file(device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"{device} missing")
    hung, result = _call_with_timeout(lambda: load_image(device))
    assert not hung
    assert isinstance(result.get("error"), ImageError), result
    assert device in str(result["error"]) and "device" in str(result["error"])


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no unix sockets")
def test_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a relative name keeps the socket path under the 108-byte limit
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind("s.sock")
        with pytest.raises(ImageError) as err:
            load_image("s.sock")
    assert_one_line_error(err, "s.sock", "socket")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert_one_line_error(err, path, "empty")


def test_text_file(tmp_path: Path) -> None:
    path = write_text_file(tmp_path / "notes.jpg")
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert_one_line_error(err, path, "not an image")


@pytest.mark.parametrize(
    ("fmt", "keep"), [("PNG", 0.6), ("JPEG", 0.6), ("JPEG", 0.97), ("GIF", 0.6), ("BMP", 0.9)]
)
def test_truncated_file(tmp_path: Path, fmt: str, keep: float) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path = write_truncated(tmp_path / f"cut.{fmt.lower()}", fmt, keep)
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert_one_line_error(err, path, "truncated")


def test_bomb_rejected_by_pil_hard_limit(tmp_path: Path) -> None:
    path = write_png_bomb(tmp_path / "bomb.png", 20000, 20000)  # 400 Mpx declared, ~50 kB on disk
    assert path.stat().st_size < 200_000
    start = time.perf_counter()
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert time.perf_counter() - start < 2.0
    assert_one_line_error(err, path, "pixels")


def test_bomb_rejected_by_max_pixels_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 9000 x 9000 = 81 Mpx: above our 64 Mpx default, below Pillow's own warning threshold (~89 Mpx).
    path = write_png_bomb(tmp_path / "big.png", 9000, 9000)
    loads: list[str] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.mode))
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert_one_line_error(err, path, "9000x9000", "64000000")
    assert loads == [], "the bomb was decoded before its size was checked"


def test_max_pixels_argument(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", gradient_rgb(40, 30))
    with pytest.raises(ImageError) as err:
        load_image(path, max_pixels=1000)
    assert_one_line_error(err, path, "40x30")
    assert load_image(path, max_pixels=1200).size == (40, 30)


def test_pil_bomb_warning_and_error_are_handled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # warning above 1000 px, error above 2000
    warn_path = write_image(tmp_path / "warn.png", gradient_rgb(40, 40))  # 1600 px
    err_path = write_image(tmp_path / "err.png", gradient_rgb(50, 50))  # 2500 px
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(warn_path).size == (40, 40)  # our max_pixels governs, no warning leaks
    with pytest.raises(ImageError) as err:
        load_image(err_path)
    assert_one_line_error(err, err_path, "pixels")
    assert Image.MAX_IMAGE_PIXELS == 1000  # load_image did not touch the global


def test_file_too_large(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a.png", gradient_rgb(40, 30))
    with pytest.raises(ImageError) as err:
        load_image(path, max_file_bytes=100)
    assert_one_line_error(err, path, "bytes")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores file modes")
def test_permission_denied_real(tmp_path: Path) -> None:
    path = write_image(tmp_path / "secret.png", gradient_rgb(8, 8))
    path.chmod(0)
    try:
        with pytest.raises(ImageError) as err:
            load_image(path)
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert_one_line_error(err, path, "permission denied")


def test_permission_denied_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_image(tmp_path / "secret.png", gradient_rgb(8, 8))

    def deny(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(image_mod.os, "open", deny)
    with pytest.raises(ImageError) as err:
        load_image(path)
    assert_one_line_error(err, path, "permission denied")


def test_path_with_nul_byte() -> None:
    with pytest.raises(ImageError):
        load_image("bad\0name.png")


# ----------------------------------------------------------------------------------------------
# Input expansion
# ----------------------------------------------------------------------------------------------


def test_is_image_path() -> None:
    for name in ["a.jpg", "b.JPEG", "c.png", "d.webp", "e.bmp", "f.GIF", "g.tif", "h.tiff", "dir/x.Png"]:
        assert is_image_path(name), name
    for name in ["a.txt", "png", "a.png.bak", "a", "a.svg", Path("x.pdf")]:
        assert not is_image_path(name), name


def _make_folder(root: Path) -> Path:
    folder = root / "imgs"
    folder.mkdir()
    for name in ["b.png", "a.JPG", "c.webp", "notes.txt", "z.tiff"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.png").write_bytes(b"x")
    (folder / "dir.png").mkdir()  # a directory with an image-like name is not an image
    return folder


def test_expand_folder_sorted_non_recursive(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path)
    got = expand_image_inputs([str(folder)])
    assert [p.name for p in got] == ["a.JPG", "b.png", "c.webp", "z.tiff"]


def test_expand_glob_file_and_order(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path)
    single = write_text_file(tmp_path / "explicit.dat")  # an explicitly named file is kept as is
    got = expand_image_inputs([str(single), str(folder / "*.png"), str(folder / "[ac].*")])
    assert got == [single, folder / "b.png", folder / "a.JPG", folder / "c.webp"]
    assert [p.name for p in expand_image_inputs([str(folder / "**" / "*.png")])] == ["b.png", "deep.png"]


def test_expand_errors(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path)
    with pytest.raises(ImageError) as err:
        expand_image_inputs([str(folder / "*.gif")])
    assert_one_line_error(err, str(folder / "*.gif"), "matched no image")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError) as err:
        expand_image_inputs([empty])
    assert_one_line_error(err, empty, "no image files")
    # A plain missing path is passed through; load_image reports it.
    assert expand_image_inputs([str(tmp_path / "missing.png")]) == [tmp_path / "missing.png"]


# ----------------------------------------------------------------------------------------------
# Import hygiene
# ----------------------------------------------------------------------------------------------


def test_import_does_not_pull_torch() -> None:
    code = "import sys, minigpt4_local.image; print('torch' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo_root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
