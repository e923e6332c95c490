"""One image-data interface for every image baseline and metric.

``source`` is one of:

- ``digits``: scikit-learn's 1,797 8x8 handwritten digits (``load_digits``,
  shipped inside the scikit-learn wheel: the offline default), 10 classes;
- an IDX images file (MNIST format, ``*-images-idx3-ubyte``, gzipped or not);
  labels come from ``labels`` or the sibling ``*-labels-idx1-ubyte[.gz]``;
- an image folder: class sub-folders (``folder/<class>/*.png``, the
  ImageFolder layout) give labels, a flat folder gives none;
- anything else is a Hugging Face dataset name (``datasets.load_dataset``),
  with ``image_column`` and ``label_column``.

Every source comes out the same way: float32 tensors ``(n, c, h, w)`` in
[0, 1], integer labels (or None), split into train and held-out parts by a
seeded shuffle. The held-out part is never trained on: it is the real side of
the metrics' real-vs-real floor and the images the restoration tasks damage.
"""

from __future__ import annotations

import gzip
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from rlhf.config import opt
from rlhf.errors import BadInput

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageDataConfig:
    """Where images come from. A plain string in a recipe is `source`."""

    source: str = opt("digits", "digits (scikit-learn's 8x8 digits, embedded), an IDX images file, an image "
                                "folder (class sub-folders = labels), or a hub dataset name")
    labels: str | None = opt(None, "IDX labels file for an IDX source (default: the sibling *-labels-idx1-ubyte[.gz])")
    split: str = opt("train", "split of a hub dataset")
    image_column: str = opt("image", "hub dataset: the image column")
    label_column: str | None = opt("label", "hub dataset: the label column (null: unlabelled)")
    image_size: int | None = opt(None, "resize to this square size (default: native; needed for mixed sizes)")
    channels: int = opt(1, "1 = grayscale, 3 = RGB")
    max_images: int | None = opt(None, "use only N images (after the seeded shuffle)")
    eval_fraction: float = opt(0.2, "held out for metrics and restoration; never trained on")

    def check(self, fail):
        if not self.source:
            raise fail("source", "required: digits, an IDX file, an image folder or a hub dataset name")
        if self.channels not in (1, 3):
            raise fail("channels", f"expected 1 or 3, got {self.channels}")
        if self.image_size is not None and self.image_size < 4:
            raise fail("image_size", f"expected >= 4, got {self.image_size}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise fail("eval_fraction", f"expected a number in (0, 1), got {self.eval_fraction}")
        if self.max_images is not None and self.max_images < 10:
            raise fail("max_images", f"expected >= 10, got {self.max_images}")


def as_image_data(value: str | ImageDataConfig) -> ImageDataConfig:
    return ImageDataConfig(source=value) if isinstance(value, str) else value


class ImageData(NamedTuple):
    """Images in [0, 1]. Shapes: train (n, c, h, w), train_labels (n,) or None; same for held."""

    train: torch.Tensor
    train_labels: torch.Tensor | None
    held: torch.Tensor
    held_labels: torch.Tensor | None
    num_classes: int  # 0 when unlabelled
    description: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])


# ---------------------------------------------------------------- readers


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT") as a uint8 array.

    Header: two zero bytes, a type byte (0x08 = unsigned byte), the number of
    dimensions, then each dimension as a big-endian int32.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path}: IDX file not found")
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise BadInput(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise BadInput(f"{path}: IDX header says {dims} but the file holds {data.size} values")
    return data.reshape(dims).copy()  # frombuffer's array is read-only


def _idx_labels_path(images: Path, labels: str | None) -> Path | None:
    if labels:
        return Path(labels)
    guess = images.with_name(images.name.replace("images-idx3", "labels-idx1"))
    return guess if guess != images and guess.is_file() else None


def _from_pil(img, channels: int, size: int | None, where: str) -> np.ndarray:
    if isinstance(img, dict) and img.get("bytes") is not None:  # an undecoded datasets Image
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(img["bytes"]))
    if not hasattr(img, "convert"):
        raise BadInput(f"{where}: expected an image, got {type(img).__name__}")
    img = img.convert("L" if channels == 1 else "RGB")
    if size is not None and img.size != (size, size):
        from PIL import Image

        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def _stack(arrays: list[np.ndarray], source: str) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise BadInput(f"{source}: images have different sizes {sorted(shapes)[:3]}...; set image_size to resize them")
    return np.stack(arrays)


def _read_folder(cfg: ImageDataConfig) -> tuple[np.ndarray, np.ndarray | None, int]:
    from PIL import Image

    root = Path(cfg.source)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
                 if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise BadInput(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in the folder or its "
                       "class sub-folders")
    arrays = []
    for f, _ in files:
        try:
            with Image.open(f) as img:
                arrays.append(_from_pil(img, cfg.channels, cfg.image_size, str(f)))
        except OSError as e:
            raise BadInput(f"{f}: not a readable image ({e})") from None
    labels = np.array([i for _, i in files]) if classes else None
    return _stack(arrays, str(root)), labels, len(classes)


def _read_hub(cfg: ImageDataConfig) -> tuple[np.ndarray, np.ndarray | None, int]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.source, split=cfg.split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise BadInput(f"image source '{cfg.source}': not digits, an IDX file or an image folder, and cannot "
                       f"load it as a hub dataset ({e})") from None
    if cfg.image_column not in ds.column_names:
        raise BadInput(f"image source '{cfg.source}': no column '{cfg.image_column}' (has {ds.column_names}); "
                       "set image_column")
    label_col = cfg.label_column if cfg.label_column in ds.column_names else None
    arrays = [_from_pil(r[cfg.image_column], cfg.channels, cfg.image_size, f"{cfg.source} row {i}")
              for i, r in enumerate(ds)]
    labels = np.array(ds[label_col]) if label_col else None
    num_classes = int(labels.max()) + 1 if labels is not None else 0
    return _stack(arrays, cfg.source), labels, num_classes


def _read(cfg: ImageDataConfig) -> tuple[np.ndarray, np.ndarray | None, int, str]:
    """uint8 images (n, c, h, w), labels or None, number of classes, a description."""
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        # 17 grey levels (0..16): scaled to 0..255 like every other source.
        images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        if cfg.channels == 3:
            images = images.repeat(3, axis=1)
        return images, d.target.astype(np.int64), 10, "scikit-learn digits (8x8)"
    path = Path(cfg.source)
    if path.is_dir():
        images, labels, k = _read_folder(cfg)
        return images, labels, k, f"image folder {path}"
    if path.is_file():
        raw = read_idx(path)
        if raw.ndim != 3:
            raise BadInput(f"{path}: expected an IDX images file of shape (n, rows, cols), got {raw.shape}")
        images = raw[:, None]
        labels_path = _idx_labels_path(path, cfg.labels)
        labels = read_idx(labels_path).astype(np.int64) if labels_path else None
        if labels is not None and len(labels) != len(images):
            raise BadInput(f"{labels_path}: {len(labels)} labels for {len(images)} images in {path}")
        return images, labels, (int(labels.max()) + 1 if labels is not None else 0), f"IDX file {path.name}"
    if cfg.source.startswith((".", "/", "~")) or path.suffix in (".gz", ".idx") or "ubyte" in path.name:
        raise BadInput(f"image source '{cfg.source}': no such file or folder")
    images, labels, k = _read_hub(cfg)
    return images, labels, k, f"hub dataset {cfg.source}[{cfg.split}]"


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    t = torch.from_numpy(images).float()
    return torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                           align_corners=False).round().clamp(0, 255).byte().numpy()


def load_images(cfg: ImageDataConfig, seed: int) -> ImageData:
    """Read, shuffle (seeded), cap, split. Raises BadInput naming the source."""
    images, labels, num_classes, what = _read(cfg)
    if cfg.image_size is not None:
        images = _resize(images, cfg.image_size)
    order = np.random.RandomState(seed % 2**32).permutation(len(images))
    if cfg.max_images is not None:
        order = order[:cfg.max_images]
    n_held = max(1, int(round(len(order) * cfg.eval_fraction)))
    if len(order) - n_held < 2:
        raise BadInput(f"image source '{cfg.source}': {len(order)} images leave too few to train on")
    held_idx, train_idx = order[:n_held], order[n_held:]
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    y = torch.from_numpy(labels) if labels is not None else None
    return ImageData(train=x[train_idx], train_labels=y[train_idx] if y is not None else None,
                     held=x[held_idx], held_labels=y[held_idx] if y is not None else None,
                     num_classes=num_classes, description=f"{what}: {len(train_idx)} train / {n_held} held-out, "
                                                          f"{images.shape[1]}x{images.shape[2]}x{images.shape[3]}")


def check_source(cfg: ImageDataConfig) -> None:
    """Validation without reading everything: the source exists and parses."""
    path = Path(cfg.source)
    if cfg.source == "digits":
        import sklearn  # noqa: F401  (the data ships inside the wheel)
        return
    if path.is_file():
        with (gzip.open(path) if path.suffix == ".gz" else path.open("rb")) as f:
            head = f.read(4)
        if len(head) < 4 or head[:3] != b"\x00\x00\x08":
            raise BadInput(f"{path}: not an unsigned-byte IDX file (bad magic number)")
        labels = _idx_labels_path(path, cfg.labels)
        if cfg.labels and not labels.is_file():
            raise BadInput(f"{cfg.labels}: IDX labels file not found")
        return
    if path.is_dir():
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in path.rglob("*")):
            raise BadInput(f"{path}: no images in the folder or its class sub-folders")
        return
    if cfg.source.startswith((".", "/", "~")) or "ubyte" in path.name:
        raise BadInput(f"image source '{cfg.source}': no such file or folder")
    # A hub name: checked when it loads (these machines cannot download).


# ---------------------------------------------------------------- pictures


def to_uint8_grid(images: torch.Tensor, nrow: int = 8, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Images in [0, 1], Shape (n, c, h, w) -> one (H, W, 3) uint8 grid, padded white,
    each pixel repeated ``scale`` times (nearest: small images stay crisp)."""
    x = images.detach().float().clamp(0, 1).cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    n, c, h, w = x.shape
    if scale > 1:
        x = x.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.ones(3, nrows * (h + pad) + pad, ncol * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = x[i]
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8, target_px: int = 48) -> Path:
    """A PNG grid of ``images`` (in [0, 1]); small images are scaled up to about ``target_px``."""
    from PIL import Image

    scale = max(1, target_px // images.shape[-1])
    Image.fromarray(to_uint8_grid(images, nrow=nrow, scale=scale)).save(path)
    return path
