"""Image pairs: how an image travels through the labeling store.

An image pair is an ordinary pair whose two responses are PNG images written
as ``data:image/png;base64,...`` URIs and whose ``meta`` says ``{"kind":
"image"}``. Everything else (leases, overlap, labels, votes, export) is the
text pairs' machinery unchanged; the page draws the two images instead of
Markdown, and ``rlhf label export`` writes the same URIs as ``chosen`` and
``rejected``, which the ``diffusion_dpo`` stage decodes.

Why data URIs rather than files: the store stays the one durable thing (a
PostgreSQL store on another machine holds its images too), the page needs no
file route, and an 8x8 or 28x28 PNG is a few hundred bytes.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
import torch

from rlhf.errors import BadInput

PNG_PREFIX = "data:image/png;base64,"
IMAGE_KIND = "image"
MAX_IMAGE_CHARS = 2_000_000  # a data URI longer than this is not one of ours


def encode_image(image: torch.Tensor) -> str:
    """A PNG data URI of one image in [0, 1]. Shape: (c, h, w), c = 1 (grey) or 3 (RGB)."""
    from PIL import Image

    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels, "L" if pixels.shape[2] == 1 else "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return PNG_PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")


def is_image(text: str) -> bool:
    """Whether ``text`` looks like a PNG data URI (prefix and length only; decode_image checks the rest)."""
    return isinstance(text, str) and text.startswith(PNG_PREFIX) and len(text) <= MAX_IMAGE_CHARS


def decode_image(text: str, where: str, channels: int | None = None) -> torch.Tensor:
    """The image of a PNG data URI, in [0, 1], Shape (c, h, w); BadInput naming ``where`` otherwise.
    ``channels`` (1 or 3) converts grey/colour to what a model expects."""
    from PIL import Image, UnidentifiedImageError

    if channels not in (None, 1, 3):
        raise BadInput(f"{where}: images with {channels} channels cannot come from a PNG here (1 or 3)")
    if not is_image(text):
        raise BadInput(f"{where}: expected a PNG data URI ({PNG_PREFIX}...), got {text[:40]!r}")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(text[len(PNG_PREFIX):], validate=True)))
        img.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(f"{where}: not a readable PNG image ({e})") from None
    if img.format != "PNG":
        raise BadInput(f"{where}: expected a PNG image, got {img.format}")
    mode = {1: "L", 3: "RGB"}.get(channels or (1 if img.mode in ("L", "LA", "I", "1") else 3))
    pixels = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def sample_image_pairs(checkpoint: str, count: int, question: str, steps: int = 20, seed: int = 0) -> list:
    """``count`` candidate pairs of images from a diffusion checkpoint (a
    ``diffusion`` or ``diffusion_dpo`` stage's final/): 2 * count images from
    DDIM on seed ``seed``'s noise, image 2i against image 2i + 1, each under
    the prompt ``question``. Sources say which seed and index drew them."""
    from rlhf.baselines.diffusion import sample
    from rlhf.labeling.pairs import Candidate

    try:
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        raise BadInput(f"--diffusion {checkpoint}: cannot load a diffusion checkpoint "
                       f"({str(e).splitlines()[0]})") from None
    images = sample(pipe.unet, pipe.scheduler.config, 2 * count, seed, steps)
    where = f"{checkpoint}#seed{seed}"
    return [Candidate(question, encode_image(images[2 * i]), encode_image(images[2 * i + 1]),
                      f"{where}:{2 * i}", f"{where}:{2 * i + 1}", f"{where}:pair{i + 1}") for i in range(count)]


def as_image_pairs(pairs: list) -> list:
    """Mark made pairs (``NewPair``) as image pairs, for the page and the stage."""
    return [p._replace(meta={**(p.meta or {}), "kind": IMAGE_KIND}) for p in pairs]
