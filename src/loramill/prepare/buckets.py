"""Aspect-ratio buckets: a portrait stays a portrait, a wide scene keeps its edges.

The bucket sizes (``resize.enable_bucket``, with kohya's option names):

- Every bucket has sides that are multiples of ``bucket_reso_steps`` and an area of at most
  ``resolution²``, so a batch never costs more memory than a square one.
- The square ``r × r`` with ``r = resolution`` rounded down to the step, and for every width
  ``w`` from ``min_bucket_reso`` to ``max_bucket_reso`` in steps: ``w × h`` and ``h × w`` with
  ``h = min(max_bucket_reso, resolution² // w)`` rounded down to the step, kept when
  ``h ≥ min_bucket_reso``. (512 px, 256–1024, step 64: 17 buckets, from 256×1024 through
  320×704, 384×640, 448×576, 512×512 to 1024×256, with 256×832 … 256×960 and 320×768.)
- An image goes to the bucket nearest its aspect ratio, measured as ``|log(w/h) - log(W/H)|``
  so a portrait and its landscape twin are equally far; on a tie, the larger bucket.
- ``bucket_no_upscale``: an image's bucket is its own size, scaled down (never up) to an area
  of at most ``resolution²``, sides rounded down to the step: small images are not blown up,
  at the cost of more, smaller buckets.

The image is then resized to cover its bucket and center-cropped (loramill.prepare.pixels). Without
buckets every image is center-cropped to ``resolution × resolution``.

Training draws every batch from one bucket (``batches``): per epoch the images of each
bucket are shuffled and cut into batches, and the batches are shuffled, all from the run's
seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loramill import LoramillError
from loramill.config import with_schema_defaults

if TYPE_CHECKING:
    import torch

Size = tuple[int, int]  # (width, height)
# resize.resolution when the config sets none: what each model family's base models were
# trained at (family names: loramill.models.families)
DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 512, "sdxl": 1024}
FAMILY_RESOLUTION = {**DEFAULT_RESOLUTION, "flux": 1024, "chroma": 1024}  # resize.resolution unset
# Flux's VAE downsamples 8× and its transformer reads 2 × 2 patches of latents
FAMILY_STEP = {"flux": 16, "chroma": 16}


def check_family_step(step: int, family: str | None) -> None:
    """Bucket sides the family's model can read: a Flux image side must divide by 16."""
    need = FAMILY_STEP.get(family or "", 8)
    if step % need:
        raise LoramillError(
            f"resize.bucket_reso_steps {step}: {family} needs bucket sides that are multiples "
            f"of {need}; use {need}, {need * 4} or another multiple"
        )


@dataclass(frozen=True)
@with_schema_defaults("resize")  # every other option's default is the schema's
class BucketSpec:
    # unset in a config: the base model family's (workflow_config); here SD's
    resolution: int = DEFAULT_RESOLUTION["sd1"]
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    bucket_no_upscale: bool

    @classmethod
    def from_settings(cls, resize: dict[str, Any]) -> BucketSpec:
        names = cls.__dataclass_fields__
        spec = cls(**{k: v for k, v in resize.items() if k in names})
        spec.check()
        return spec

    def check(self) -> None:
        """Contradicting options, named by their config keys."""
        if not self.enable_bucket:
            return
        step = self.bucket_reso_steps
        for key in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(self, key) % step:
                raise LoramillError(
                    f"resize.{key} ({getattr(self, key)}) is not a multiple of "
                    f"resize.bucket_reso_steps ({step})"
                )
        if not self.min_bucket_reso <= self.resolution <= self.max_bucket_reso:
            raise LoramillError(
                f"resize.resolution ({self.resolution}) is outside resize.min_bucket_reso "
                f"({self.min_bucket_reso}) … resize.max_bucket_reso ({self.max_bucket_reso}); "
                "set them around it, or resize.enable_bucket: false"
            )
        if self.resolution < step:
            raise LoramillError(
                f"resize.bucket_reso_steps ({step}) is above resize.resolution ({self.resolution})"
            )


def _down(value: float, step: int) -> int:
    return int(value // step) * step


def bucket_sizes(spec: BucketSpec) -> list[Size]:
    """Every bucket, sorted by width."""
    if not spec.enable_bucket:
        return [(spec.resolution, spec.resolution)]
    step, area = spec.bucket_reso_steps, spec.resolution**2
    side = _down(spec.resolution, step)
    sizes = {(side, side)}
    for width in range(spec.min_bucket_reso, spec.max_bucket_reso + 1, step):
        height = min(spec.max_bucket_reso, _down(area // width, step))
        if height >= spec.min_bucket_reso:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest(size: Size, buckets: list[Size]) -> Size:
    """The bucket nearest ``size``'s aspect ratio; the larger one on a tie."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - ratio), 9), -b[0] * b[1]))


def unscaled_bucket(size: Size, spec: BucketSpec) -> Size:
    """``bucket_no_upscale``: the image's own size, scaled down to fit the area, on the grid."""
    width, height = size
    scale = min(1.0, spec.resolution / math.sqrt(width * height))
    step = spec.bucket_reso_steps
    return (max(step, _down(width * scale, step)), max(step, _down(height * scale, step)))


def bucket_for(size: Size, spec: BucketSpec, buckets: list[Size]) -> Size:
    """The size an image of ``size`` (as displayed) is trained at."""
    if spec.enable_bucket and spec.bucket_no_upscale:
        return unscaled_bucket(size, spec)
    return nearest(size, buckets)


Repeats = int | Sequence[int]  # times per epoch: of every image, or per image


def _per_image(count: int, repeats: Repeats) -> list[int]:
    return [repeats] * count if isinstance(repeats, int) else list(repeats)


def batches_per_epoch(sizes: list[Size], batch_size: int, repeats: Repeats = 1) -> int:
    """How many batches ``batches`` makes of one epoch."""
    counts: dict[Size, int] = {}
    for size, times in zip(sizes, _per_image(len(sizes), repeats), strict=True):
        counts[tuple(size)] = counts.get(tuple(size), 0) + times
    return sum(-(-n // batch_size) for n in counts.values())


def batches(
    sizes: list[Size], batch_size: int, generator: torch.Generator, repeats: Repeats = 1
) -> list[list[int]]:
    """One epoch of batches of example indices, each batch from a single bucket; with
    ``repeats`` every image (or each image, given one count per image) is in the epoch that
    many times (kohya's folder repeats)."""
    import torch  # here: the workflow reads this module when it parses, and torch is slow

    by_bucket: dict[Size, list[int]] = {}
    for index, (size, times) in enumerate(zip(sizes, _per_image(len(sizes), repeats), strict=True)):
        by_bucket.setdefault(tuple(size), []).extend([index] * times)
    epoch = []
    for bucket in sorted(by_bucket):
        members = torch.tensor(by_bucket[bucket])
        shuffled = members[torch.randperm(len(members), generator=generator)].tolist()
        epoch += [shuffled[i : i + batch_size] for i in range(0, len(shuffled), batch_size)]
    order = torch.randperm(len(epoch), generator=generator).tolist()
    return [epoch[i] for i in order]
