"""One image file to training pixels: decoded fast, upright, in sRGB, cropped to its bucket.

- JPEGs are decoded in draft mode (the decoder's DCT scaling: 1/2, 1/4 or 1/8 of the pixels)
  to the smallest size that still covers the bucket, then resampled with Lanczos: the same
  result as a full decode for a fraction of the work.
- EXIF orientation is applied; an embedded ICC profile is converted to sRGB (a wide-gamut or
  CMYK photo keeps its colours); transparency (RGBA, LA, P with a transparent colour) is
  flattened onto ``resize.background``; 16-bit greyscale is scaled, not clipped.
- Pillow's decompression-bomb limit stays on: over it, the file is refused before decoding.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

from PIL import Image, ImageCms, ImageColor, ImageOps, UnidentifiedImageError

from loramill.prepare.buckets import Size

EXIF_ORIENTATION = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height
SRGB = ImageCms.createProfile("sRGB")


class Unusable(ValueError):
    """A file that cannot be trained on; the message is the quarantine reason."""


def displayed_size(image: Image.Image) -> Size:
    """Width and height once the EXIF orientation is applied (read from the header only)."""
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return image.size[::-1] if orientation in TRANSPOSED else image.size


def cover_size(size: Size, bucket: Size) -> Size:
    """The smallest size with ``size``'s aspect ratio that covers ``bucket``."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return (max(bucket[0], math.ceil(size[0] * scale)), max(bucket[1], math.ceil(size[1] * scale)))


def crop_top_left(size: Size, bucket: Size) -> tuple[int, int]:
    """Where :func:`fit` crops ``size`` to ``bucket``, as (top, left) in pixels of the image
    scaled to cover the bucket: the centred crop, rounded down as kohya rounds it. SDXL is
    told it per image (loramill.models.sdxl)."""
    width, height = cover_size(size, bucket)
    return (height - bucket[1]) // 2, (width - bucket[0]) // 2


def open_image(path: Path) -> Image.Image:
    """Open (header only) with the bomb limit as an error, not a warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise Unusable(f"decompression-bomb limit: {error}") from None
    except UnidentifiedImageError:
        raise Unusable("not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError) as error:
        raise Unusable(f"corrupt image: {error}") from None


def decode(image: Image.Image, bucket: Size) -> Image.Image:
    """Fully decode ``image``, in draft mode where the format has one, then orient it."""
    width, height = cover_size(displayed_size(image), bucket)
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    image.draft(None, (height, width) if orientation in TRANSPOSED else (width, height))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise Unusable(f"corrupt image: {error}") from None
    return ImageOps.exif_transpose(image)


def to_srgb(image: Image.Image) -> Image.Image:
    """Convert through the embedded ICC profile, when there is one Pillow can read."""
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "RGBA", "CMYK", "L", "LA"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        mode = "RGBA" if "A" in image.mode else "RGB"
        return ImageCms.profileToProfile(image, source, SRGB, outputMode=mode)
    except (ImageCms.PyCMSError, OSError):
        return image  # an unreadable profile: the pixels as they are, like most viewers


def to_rgb(image: Image.Image, background: str) -> Image.Image:
    """RGB, with any transparency flattened onto ``background`` (a colour name or #hex)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        image = image.point(lambda v: v / 256).convert("L")
    image = to_srgb(image)
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, ImageColor.getrgb(background))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def fit(image: Image.Image, bucket: Size) -> Image.Image:
    """Resize to cover ``bucket`` and crop the middle (Lanczos, on the cropped region only)."""
    return ImageOps.fit(image, bucket, method=Image.Resampling.LANCZOS)
