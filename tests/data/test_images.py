"""dp_utils.data.images: every PIL mode to 8-bit RGB, checked on scikit-image's sample photos; content fingerprints."""

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from dp_utils.data.images import ImageSource, center_crop_arr, load_image, read_image_folder, to_rgb

CAMERA = skimage.data.camera()  # (512, 512) uint8, values 0..255
COFFEE = skimage.data.coffee()  # (400, 600, 3) uint8


def reopen(image: Image.Image, fmt: str) -> Image.Image:
    """`image` written to a file of format `fmt` and read back as the script reads it."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return load_image(buffer.getvalue())


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def grey(image: Image.Image) -> np.ndarray:
    """The RGB conversion of a greyscale image, checked to be grey, as one channel."""
    rgb = np.asarray(to_rgb(image))
    assert rgb.dtype == np.uint8 and rgb.shape == (*CAMERA.shape, 3)
    assert (rgb == rgb[..., :1]).all()
    return rgb[..., 0]


def test_alpha_sixteen_bit_and_palette_files(photo_dir):
    rgba = Image.open(photo_dir / "misc/astronaut_rgba.png")
    assert rgba.mode == "RGBA"
    rgb = np.asarray(to_rgb(rgba))
    assert rgb.dtype == np.uint8 and rgb.shape == (512, 512, 3)
    assert (rgb[:, :64] == 255).all()  # fully transparent pixels composited on white
    opaque = np.asarray(rgba)[:, -1, :3]
    np.testing.assert_allclose(rgb[:, -1].astype(int), opaque.astype(int), atol=1)

    sixteen = Image.open(photo_dir / "misc/camera16.png")
    assert sixteen.mode == "I;16"
    converted = np.asarray(to_rgb(sixteen))
    # Written as camera * 257: rescaled back to the 8-bit photo exactly, not clipped to white.
    np.testing.assert_array_equal(converted, np.repeat(CAMERA[..., None], 3, axis=-1))

    alpha = np.full_like(CAMERA, 255)
    alpha[:, :100] = 0
    grey_alpha = np.asarray(to_rgb(Image.fromarray(np.dstack([CAMERA, alpha]), mode="LA")))
    assert (grey_alpha[:, :100] == 255).all() and (grey_alpha[:, 100:, 1] == CAMERA[:, 100:]).all()

    palette = Image.open(photo_dir / "cat/coffee_palette.png")
    cmyk = Image.open(photo_dir / "cat/coffee_cmyk.jpg")
    assert (palette.mode, cmyk.mode) == ("P", "CMYK")
    for image in (palette, cmyk):
        rgb = np.asarray(to_rgb(image))
        assert rgb.shape == COFFEE.shape and correlation(rgb, COFFEE) > 0.98


@pytest.mark.parametrize(
    ("pixels", "fmt", "mode"),
    [
        (CAMERA.astype(np.uint16) * 257, "TIFF", "I;16"),  # 16-bit: by the type's range
        (CAMERA.astype(np.int32) * 1000, "TIFF", "I"),  # int32 beyond 16 bits: by its own range
        (CAMERA.astype(np.int32) + 70000, "TIFF", "I"),  # int32 far from 0: by its own range
        (CAMERA.astype(np.int16) - 1024, "TIFF", "I"),  # signed 16-bit with negative values (PIL reads it as I)
        (CAMERA.astype(np.float32) / 255, "TIFF", "F"),  # float in 0..1: times 255
        (CAMERA.astype(np.float32) * 3.5 - 400, "TIFF", "F"),  # float of any range: by its own range
    ],
    ids=["I;16", "int32-large", "int32-offset", "int16-negative", "float-unit", "float-any"],
)
def test_high_bit_depth_files_give_the_photo_back(pixels, fmt, mode):
    image = reopen(Image.fromarray(pixels), fmt)
    assert image.mode == mode
    np.testing.assert_array_equal(grey(image), CAMERA)  # CAMERA spans 0..255, so each rule gives it back exactly


def test_big_endian_sixteen_bit_is_scaled_by_its_type_range():
    dark = (CAMERA.astype(np.uint16) // 4) * 257  # a dark 16-bit photo (0..63 in 8 bits) stays dark
    image = Image.frombytes("I;16B", CAMERA.shape[::-1], dark.astype(">u2").tobytes())
    np.testing.assert_array_equal(grey(image), CAMERA // 4)


def test_int32_within_eight_bits_keeps_its_brightness():
    image = reopen(Image.fromarray(CAMERA.astype(np.int32) // 2), "TIFF")
    assert image.mode == "I"
    np.testing.assert_array_equal(grey(image), CAMERA // 2)  # not stretched to 0..255


def test_float_images_that_cannot_be_scaled():
    constant = Image.fromarray(np.full(CAMERA.shape, 7.5, dtype=np.float32))
    assert (grey(constant) == 0).all()  # documented: a constant image outside 0..1 becomes black
    broken = CAMERA.astype(np.float32)
    broken[10, 10] = np.nan
    with pytest.raises(ValueError, match="mode F image has NaN or infinite pixels"):
        to_rgb(reopen(Image.fromarray(broken), "TIFF"))


def test_one_bit_and_palettes():
    bits = reopen(Image.fromarray(CAMERA > 128), "PNG")
    assert bits.mode == "1"
    np.testing.assert_array_equal(grey(bits), np.where(CAMERA > 128, 255, 0))

    palette = reopen(Image.fromarray(COFFEE).quantize(32), "PNG")
    assert palette.mode == "P"
    assert correlation(np.asarray(to_rgb(palette)), COFFEE) > 0.97

    transparent = Image.fromarray(COFFEE).quantize(31)  # entries 0..30: index 31 is free
    mask = np.zeros(COFFEE.shape[:2], dtype=bool)
    mask[:, :150] = True
    pixels = np.asarray(transparent).copy()
    pixels[mask] = 31  # the free palette entry, declared transparent
    with_index = Image.fromarray(pixels, mode="P")
    with_index.putpalette(transparent.getpalette()[: 31 * 3] + [0, 0, 0])
    buffer = io.BytesIO()
    with_index.save(buffer, "PNG", transparency=31)
    reread = load_image(buffer.getvalue())
    assert reread.mode == "P" and "transparency" in reread.info
    rgb = np.asarray(to_rgb(reread))
    assert (rgb[mask] == 255).all() and correlation(rgb[:, 150:], COFFEE[:, 150:]) > 0.95

    alpha = np.where(mask, 0, 255).astype(np.uint8)
    pa = transparent.convert("PA")
    pa.putalpha(Image.fromarray(alpha))
    assert pa.mode == "PA"
    rgb = np.asarray(to_rgb(pa))
    assert (rgb[mask] == 255).all() and correlation(rgb[:, 150:], COFFEE[:, 150:]) > 0.97


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_files(fmt):
    image = reopen(Image.fromarray(COFFEE).convert("CMYK"), fmt)
    assert image.mode == "CMYK"
    assert correlation(np.asarray(to_rgb(image)), COFFEE) > 0.99


@pytest.mark.parametrize("mode", ["YCbCr", "LAB", "HSV", "RGBX", "RGBa"])
def test_other_colour_modes(mode):
    rgb = np.asarray(to_rgb(Image.fromarray(COFFEE).convert(mode)))
    assert rgb.shape == COFFEE.shape and correlation(rgb, COFFEE) > 0.999


def test_premultiplied_grey_alpha():
    alpha = np.full_like(CAMERA, 255)
    alpha[:, :100] = 0
    la = Image.fromarray(np.dstack([CAMERA, alpha]), mode="LA").convert("La")
    assert la.mode == "La"  # PIL converts La to LA only
    rgb = np.asarray(to_rgb(la))
    assert (rgb[:, :100] == 255).all() and (rgb[:, 100:, 0] == CAMERA[:, 100:]).all()


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (20, 17), (64, 64), (1000, 130)])
def test_center_crop_gives_a_square_of_the_resolution(size):
    image = Image.new("RGB", size, (10, 20, 30))
    assert center_crop_arr(image, 32).size == (32, 32)


def test_fingerprint_follows_bytes_names_and_labels(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    pixels = CAMERA[:64, :64].copy()
    for path in ("a/1.bmp", "a/2.bmp", "b/3.bmp"):
        Image.fromarray(pixels).save(tmp_path / path)
    source = read_image_folder(str(tmp_path), unconditional=False)
    before = source.fingerprint(0, 3)
    assert source.fingerprint(0, 3) == before and source.fingerprint(0, 2) != before

    pixels[0, 0] ^= 1  # one pixel, same file size: a listing of names and sizes would not see it
    size = (tmp_path / "a/2.bmp").stat().st_size
    Image.fromarray(pixels).save(tmp_path / "a/2.bmp")
    assert (tmp_path / "a/2.bmp").stat().st_size == size
    assert source.fingerprint(0, 3) != before
    assert source.fingerprint(0, 1) == read_image_folder(str(tmp_path), unconditional=False).fingerprint(0, 1)

    unconditional = read_image_folder(str(tmp_path), unconditional=True)
    relabelled = ImageSource(source.ids, [1, 1, 1], ["x", "y"], paths=source.paths)
    assert len({source.fingerprint(0, 3), unconditional.fingerprint(0, 3), relabelled.fingerprint(0, 3)}) == 3
    (tmp_path / "b/3.bmp").unlink()  # an unreadable file still has a fingerprint, and a fix changes it
    missing = source.fingerprint(2, 3)
    Image.fromarray(pixels).save(tmp_path / "b/3.bmp")
    assert source.fingerprint(2, 3) != missing
