"""Image bytes -> the RGB picture the model sees, with limits checked before any pixel is decoded.

One place for it: the CPU validation stage decodes every image here (so bad ones fail before GPU time) and, given
the model's resolution, resizes it once into model-ready pixels (PIXELS_COLUMN) for the VQA worker; the worker
decodes with the same function where a row has no such pixels (a direct caller's rows: image_bytes alone).

Conversion rules (PIL's `convert("RGB")` alone would get several of these wrong):
- transparency (RGBA, LA, PA, RGBa, P or L or RGB with a transparent colour): composited on BACKGROUND (white, what
  a viewer shows a transparent PNG on); PIL would drop the alpha and show whatever colour hides under it
- 16-bit grayscale (I;16, I;16B, I;16L): scaled by 255/65535; PIL clips every value above 255 to white
- I (32-bit int): scaled as 16-bit when a value exceeds 255 (Pillow reads some 16-bit files as I), else as 8-bit
- F (float): [0, 1] when no value exceeds 1, else [0, 255]; out-of-range values are clipped
- 1, L, P, CMYK, YCbCr, RGBX, ...: PIL's conversion (CMYK: R = (255 - C)(255 - K) / 255)
- EXIF orientation is applied, so the model sees the photo the way a viewer shows it
"""

import io
import warnings

import numpy as np

BACKGROUND = (255, 255, 255)  # behind transparent pixels
# The CPU stage's model-ready image (model_pixels): read by the VQA worker, never written to the output
PIXELS_COLUMN = "model_pixels"


class ImageError(ValueError):
    """An image that cannot become model input; the message is the row's error."""


def check_image_bytes(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ImageError(f"image is {size} bytes, over the {max_bytes}-byte limit (params.max_image_bytes)")


def decode_image(data: bytes, max_pixels: int, max_bytes: int):
    """Encoded image bytes -> PIL RGB image, within the limits (VQAParams.max_image_pixels / max_image_bytes).
    Raises ImageError (size, pixel count, format, mode) with a message that names the problem and the limit. The
    pixel count is read from the header, before decoding."""
    from PIL import Image, ImageOps

    if not isinstance(data, (bytes, bytearray)):
        raise ImageError(f"image must be bytes, got {type(data).__name__}")
    check_image_bytes(len(data), max_bytes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over Pillow's own ceiling, which no limit exceeds
        raise ImageError(f"image is over the {max_pixels}-pixel limit (params.max_image_pixels): {e}") from None
    except Exception as e:  # noqa: BLE001 -- any parser failure is this row's problem
        raise ImageError(_decode_message(len(data), e)) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"image is {width}x{height} = {width * height} pixels, over the {max_pixels}-pixel "
                             f"limit (params.max_image_pixels); downscale it or raise the limit")
        try:
            image.load()  # decodes the whole file: catches truncated data that the header alone does not
            return to_rgb(ImageOps.exif_transpose(image))
        except ImageError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ImageError(_decode_message(len(data), e)) from None


def model_pixels(image, resolution: int) -> bytes:
    """A decoded RGB image (decode_image) -> the model's input pixels: resized and centre-cropped to resolution R
    by the model's own function (showo2/image_input.py), as R*R*3 bytes of uint8 RGB, row-major (R, R, 3).

    Memory: R*R*3 bytes a row (560 KB at 432 px), often more than the encoded image; kept uint8 (a float copy would
    be 4x that) and made only by the CPU stage, which hands them to the worker instead of a second decode."""
    from flashu_batch.showo2.image_input import resize_center_crop  # PIL and numpy only, no torch

    return resize_center_crop(image, resolution).tobytes()


def pixels_array(data, resolution: int) -> np.ndarray | None:
    """model_pixels' bytes -> (R, R, 3) uint8, or None when there are none or they are not R x R RGB (made for
    another resolution than this model's): the caller then decodes image_bytes itself."""
    if not isinstance(data, (bytes, bytearray)) or len(data) != resolution * resolution * 3:
        return None
    return np.frombuffer(data, dtype=np.uint8).reshape(resolution, resolution, 3)


def _decode_message(size: int, e: BaseException) -> str:
    # PIL's own message for an unknown format names a memory address: not reproducible across runs
    reason = "not a recognized image format" if type(e).__name__ == "UnidentifiedImageError" else \
        f"{type(e).__name__}: {e}"
    return f"image could not be decoded ({size} bytes): {reason}"


def to_rgb(image):
    """A decoded PIL image of any mode -> RGB, by the rules in the module docstring."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_to_8bit(np.asarray(image), image.mode)).convert("RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as e:  # a mode PIL cannot convert (e.g. La)
        raise ImageError(f"image mode {image.mode!r} is not supported ({e}); save it as RGB or RGBA") from None


def _to_8bit(pixels: np.ndarray, mode: str) -> np.ndarray:
    """(H, W) 16-bit, 32-bit int or float grayscale -> (H, W) uint8, scaled by the value range the mode implies."""
    values = pixels.astype(np.float64)
    peak = values.max(initial=0)
    if mode.startswith("I;16"):
        full = 65535.0
    elif mode == "F":
        full = 1.0 if peak <= 1 else 255.0
    else:  # I
        full = 65535.0 if peak > 255 else 255.0
    return np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
