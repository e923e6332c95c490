"""Image-generation metrics, computed the same way for every model.

The feature space. FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500)
measures distances in the features of an ImageNet Inception network; those
weights cannot be downloaded here, and Inception features of 8x8 digits would
mean little anyway. So, like the "FID with a domain classifier" used for MNIST
(e.g. Lucic et al. 2018, https://arxiv.org/abs/1711.10337), the features are
the penultimate layer (64 units) of a small CNN (``FeatureNet``) trained once
on the *same real training images* to predict their labels (unlabelled data:
k-means cluster ids). It is trained with a fixed seed and cached under a key
that hashes the training images, labels and its own settings, so every model
in a comparison -- and every later run on the same data -- is judged by the
identical network. Its held-out accuracy is reported beside the metrics: a
classifier that cannot tell the classes apart gives features that cannot
either. Numbers are comparable within one data set and classifier, never with
published Inception FIDs.

Metrics of ``n`` generated images against the real training images, with
``n`` = the number of held-out real images, so the real-vs-real floor (the
held-out images scored as if generated) is computed like for like:

- ``fd``: Fréchet distance between Gaussians fitted to the two feature sets
  (Dowson & Landau 1982; the FID formula). Lower is better; the floor is > 0
  because of finite samples.
- ``precision`` / ``recall``: improved precision and recall (Kynkäänniemi et
  al. 2019, https://arxiv.org/abs/1904.06991): the real (fake) manifold is the
  union of balls around each real (fake) feature vector reaching its k-th
  nearest neighbour; precision = share of fakes inside the real manifold
  (quality), recall = share of reals inside the fake manifold (coverage).
- ``class_entropy``: entropy (bits) of the classifier's predicted classes over
  the samples; log2(classes) when every class is equally common, 0 when the
  model makes one class only (mode collapse).
- ``nn_distance``: mean RMS pixel distance from each sample to its nearest
  training image; ``near_copy_rate``: share of samples closer to a training
  image than 95% of held-out real images are (so real data scores 0.05; a
  model that copies its training set scores far above).

Restoration (the diffusion stage): ``psnr_ssim`` -- PSNR in dB for pixels in
[0, 1], and SSIM (Wang et al. 2004) from scikit-image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from rlhf.baselines.images import ImageData
from rlhf.config import opt, require_positive

log = logging.getLogger(__name__)

FEATURE_NET_VERSION = 1  # bump when FeatureNet or its training changes: old caches stop matching


@dataclass
class ImageMetricsConfig:
    """How generated images are scored (keep it the same for every model compared)."""

    k: int = opt(3, "neighbours that set the precision/recall manifold radii (Kynkäänniemi et al. use 3)")
    classifier_epochs: int = opt(30, "epochs of the feature classifier's training (once per data set, cached)")
    classifier_cache: str | None = opt(None, "feature-classifier cache dir (default: $RLHF_CACHE/feature_nets, "
                                             "else ~/.cache/rlhf/feature_nets)")

    def check(self, fail):
        require_positive(self, fail, "k", "classifier_epochs")


# ---------------------------------------------------------------- pure metric functions


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance. Shape: (n, d) -> (d,), (d, d)."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    (Dowson & Landau 1982). As in the reference FID code (pytorch-fid), a
    singular product gets ``eps`` added to the diagonals, and the square
    root's negligible imaginary part (numerical error) is dropped.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            log.warning("Fréchet distance: sqrtm has a large imaginary part (%.3g)",
                        np.max(np.abs(covmean.imag)))
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    return float(max(value, 0.0))


def frechet_distance_of(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets. Shape: (n, d), (m, d)."""
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def _distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048):
    """Yields (row slice, distance block) of the (len(a), len(b)) Euclidean distances, in row chunks."""
    for i in range(0, len(a), chunk):
        yield slice(i, i + chunk), torch.cdist(a[i:i + chunk], b)


def knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest *other* point. Shape: (n, d) -> (n,)."""
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    if len(t) <= k:
        raise ValueError(f"need more than k={k} points, got {len(t)}")
    radii = torch.empty(len(t), dtype=torch.float64)
    for rows, d in _distances(t, t):
        radii[rows] = d.kthvalue(k + 1, dim=1).values  # the 1st smallest is the point itself (0)
    return radii.numpy()


def _inside(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """For each query, whether it lies in any ball (centre, radius). Shape: (q, d) -> (q,) bool."""
    inside = torch.zeros(len(queries), dtype=torch.bool)
    for rows, d in _distances(queries, centres):
        inside[rows] = (d <= radii[None]).any(1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Sec. 2).

    precision = mean over fakes of [fake inside the k-NN manifold of the reals];
    recall    = mean over reals of [real inside the k-NN manifold of the fakes].
    Shape: real (n, d), fake (m, d) -> two floats in [0, 1].
    """
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    r_radii = torch.as_tensor(knn_radii(real, k))
    f_radii = torch.as_tensor(knn_radii(fake, k))
    precision = _inside(f, r, r_radii).double().mean().item()
    recall = _inside(r, f, f_radii).double().mean().item()
    return precision, recall


def class_entropy(predicted: np.ndarray, num_classes: int) -> float:
    """Entropy in bits of the predicted-class histogram. Shape: (n,) ints -> float in [0, log2 K]."""
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=num_classes).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def nearest_neighbours(queries: torch.Tensor, refs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS pixel distance from each query to its nearest ref, and that ref's index.

    Shape: queries (q, c, h, w), refs (r, c, h, w) -> (q,), (q,).
    """
    qf = queries.reshape(len(queries), -1).double()
    rf = refs.reshape(len(refs), -1).double()
    dist = torch.empty(len(qf), dtype=torch.float64)
    idx = torch.empty(len(qf), dtype=torch.long)
    for rows, d in _distances(qf, rf):
        dist[rows], idx[rows] = d.min(1)
    return dist / math.sqrt(qf.shape[1]), idx


# ---------------------------------------------------------------- restoration scores


def psnr_ssim(reference: torch.Tensor, test: torch.Tensor, where: torch.Tensor | None = None) -> tuple[float, float]:
    """Mean PSNR (dB, data range 1) and SSIM over image pairs (scikit-image).

    SSIM uses a 3x3 window on images under 16 px (the usual 7x7 would leave a
    2x2 valid region on 8x8 digits), else 7x7. ``where`` (1 = counted)
    restricts PSNR to those pixels; SSIM is always over the whole image.
    Shape: (n, c, h, w) x 2 -> two floats.
    """
    from skimage.metrics import structural_similarity

    ref, tst = reference.double().numpy(), test.double().numpy()
    win = 3 if min(ref.shape[-2:]) < 16 else 7
    psnrs, ssims = [], []
    for i in range(len(ref)):
        m = np.ones_like(ref[i]) if where is None else np.broadcast_to(where[i].numpy(), ref[i].shape)
        mse = float(((ref[i] - tst[i]) ** 2 * m).sum() / max(m.sum(), 1))
        psnrs.append(10 * math.log10(1.0 / max(mse, 1e-10)))
        if ref.shape[1] == 1:
            ssims.append(structural_similarity(ref[i, 0], tst[i, 0], data_range=1.0, win_size=win))
        else:
            ssims.append(structural_similarity(ref[i], tst[i], data_range=1.0, win_size=win, channel_axis=0))
    return float(np.mean(psnrs)), float(np.mean(ssims))


def central_hole(shape, fraction: float) -> torch.Tensor:
    """Known-pixel mask (1 = observed) with a centred square hole. Shape: (n, 1, h, w)."""
    n, _, h, w = shape
    side = max(1, round(min(h, w) * fraction))
    top, left = (h - side) // 2, (w - side) // 2
    known = torch.ones(n, 1, h, w)
    known[:, :, top:top + side, left:left + side] = 0
    return known


# ---------------------------------------------------------------- the feature classifier


class FeatureNet(nn.Module):
    """Small CNN classifier; its 64-unit penultimate layer is the metric feature space.

    conv3x3(32) -> conv3x3(32) -> pool -> conv3x3(64) -> conv3x3(64) -> global average
    pool -> linear(64) = features -> ReLU -> linear(classes). Global pooling makes it
    work at any image size (8x8 digits to 32x32 RGB).
    """

    def __init__(self, channels: int, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2 * width, feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape: (b, c, h, w) in [0, 1] -> features (b, 64), logits (b, classes).

        The features are taken before the last ReLU: after it, units that are
        dead for every image make the covariance singular.
        """
        features = self.body(x * 2 - 1)
        return features, self.head(features)

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """Features and predicted classes, batched, as numpy. Shape: (n, c, h, w) -> (n, 64), (n,)."""
        self.eval()
        feats, preds = [], []
        for i in range(0, len(x), batch_size):
            f, logits = self(x[i:i + batch_size].float())
            feats.append(f)
            preds.append(logits.argmax(1))
        return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def _pseudo_labels(images: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Unlabelled data: k-means cluster ids of the pixels stand in for classes."""
    from sklearn.cluster import KMeans

    flat = images.reshape(len(images), -1).numpy()
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(flat)


def _cache_dir(cfg: ImageMetricsConfig) -> Path:
    if cfg.classifier_cache:
        return Path(cfg.classifier_cache)
    root = os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf"
    return Path(root) / "feature_nets"


def _cache_key(data: ImageData, labels: np.ndarray, cfg: ImageMetricsConfig, seed: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{FEATURE_NET_VERSION}|epochs={cfg.classifier_epochs}|seed={seed}|".encode())
    h.update(str(tuple(data.train.shape)).encode())
    h.update(data.train.numpy().tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _train_feature_net(x: torch.Tensor, y: np.ndarray, num_classes: int, epochs: int, seed: int) -> FeatureNet:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = FeatureNet(x.shape[1], num_classes)
    opt_ = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_, T_max=epochs)
    labels = torch.as_tensor(y, dtype=torch.long)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            xb = x[idx]
            # One-pixel random shifts: a little augmentation so the features
            # do not hinge on exact pixel positions.
            shift = torch.randint(-1, 2, (2,), generator=gen).tolist()
            xb = torch.roll(xb, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(net(xb)[1], labels[idx])
            opt_.zero_grad()
            loss.backward()
            opt_.step()
        sched.step()
    return net.eval()


class FeatureClassifier(NamedTuple):
    net: FeatureNet
    num_classes: int
    key: str
    held_out_accuracy: float
    labels_from: str  # "labels" or "k-means"


def feature_classifier(data: ImageData, cfg: ImageMetricsConfig, seed: int = 0) -> FeatureClassifier:
    """The feature classifier for ``data``: loaded from the cache, or trained once and cached.

    Labelled data trains on its labels; unlabelled data on k-means(10) cluster ids.
    """
    from safetensors.torch import load_file, save_file

    if data.train_labels is not None:
        y, held_y, k, source = data.train_labels.numpy(), data.held_labels.numpy(), data.num_classes, "labels"
    else:
        k, source = 10, "k-means"
        y = _pseudo_labels(data.train, k, seed)
        held_y = None
    key = _cache_key(data, y, cfg, seed)
    where = _cache_dir(cfg) / key
    net = FeatureNet(data.train.shape[1], k)
    if (where / "model.safetensors").is_file() and (where / "info.json").is_file():
        net.load_state_dict(load_file(where / "model.safetensors"))
        info = json.loads((where / "info.json").read_text())
        log.info("feature classifier: cached %s (held-out accuracy %.3f)", where, info["held_out_accuracy"])
        return FeatureClassifier(net.eval(), k, key, info["held_out_accuracy"], source)
    log.info("feature classifier: training on %d images (%d epochs), cached at %s", len(data.train),
             cfg.classifier_epochs, where)
    net = _train_feature_net(data.train, y, k, cfg.classifier_epochs, seed)
    acc = float("nan")
    if held_y is not None:
        acc = float((net.embed(data.held)[1] == held_y).mean())
    tmp = where.with_name(f".{key}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), tmp / "model.safetensors")
    (tmp / "info.json").write_text(json.dumps({
        "held_out_accuracy": acc, "classes": k, "labels_from": source, "data": data.description,
        "epochs": cfg.classifier_epochs, "seed": seed, "version": FEATURE_NET_VERSION}, indent=2) + "\n")
    try:
        tmp.rename(where)  # atomic: a concurrent run that got there first wins, ours is dropped
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return FeatureClassifier(net, k, key, acc, source)


# ---------------------------------------------------------------- scoring a model against real data


class RealReference(NamedTuple):
    """Everything generated images are compared against, computed once per stage."""

    data: ImageData
    classifier: FeatureClassifier
    train_features: np.ndarray
    held_threshold: float  # 5th percentile of held-out images' nearest-train distance
    k: int

    @property
    def n(self) -> int:
        return len(self.data.held)


def real_reference(data: ImageData, cfg: ImageMetricsConfig, seed: int = 0) -> RealReference:
    clf = feature_classifier(data, cfg, seed)
    train_features, _ = clf.net.embed(data.train)
    held_nn, _ = nearest_neighbours(data.held, data.train)
    return RealReference(data, clf, train_features, float(np.quantile(held_nn.numpy(), 0.05)), cfg.k)


def score(images: torch.Tensor, ref: RealReference) -> dict[str, float]:
    """The shared metrics of ``images`` (in [0, 1], Shape (n, c, h, w)) against the real training set."""
    images = images.float().clamp(0, 1)
    feats, preds = ref.classifier.net.embed(images)
    precision, recall = precision_recall(ref.train_features, feats, ref.k)
    nn_dist, _ = nearest_neighbours(images, ref.data.train)
    return {
        "fd": frechet_distance_of(feats, ref.train_features),
        "precision": precision,
        "recall": recall,
        "class_entropy": class_entropy(preds, ref.classifier.num_classes),
        "nn_distance": float(nn_dist.mean()),
        "near_copy_rate": float((nn_dist < ref.held_threshold).double().mean()),
    }


def noise_baseline(data: ImageData, n: int, seed: int) -> torch.Tensor:
    """The trivial generator: per-pixel Gaussian noise with the training data's
    per-pixel mean and standard deviation, clipped to [0, 1]. Shape: (n, c, h, w)."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = data.train.mean(0), data.train.std(0)
    return (mean + std * torch.randn((n, *mean.shape), generator=gen)).clamp(0, 1)


def reference_rows(ref: RealReference, seed: int) -> dict[str, dict[str, float]]:
    """The floor (held-out real images scored as if generated) and the trivial noise baseline."""
    return {"real held-out (floor)": score(ref.data.held, ref),
            "per-pixel Gaussian noise": score(noise_baseline(ref.data, ref.n, seed), ref)}


def max_class_entropy(ref: RealReference) -> float:
    return math.log2(ref.classifier.num_classes)
