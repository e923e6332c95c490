"""Image-generation metrics, computed the same way for every model.

The feature spaces. FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500)
measures distances in the features of an ImageNet Inception network; those
weights cannot be downloaded here, and Inception features of 8x8 digits would
mean little anyway. So, like the "FID with a domain classifier" used for MNIST
(e.g. Lucic et al. 2018, https://arxiv.org/abs/1711.10337), the features are
the penultimate layer (64 units) of small CNNs (``FeatureNet``) trained on the
*same real training images* to predict their labels (unlabelled data: k-means
cluster ids), with small shifts and blur as augmentation. One such network's
numbers moved a lot with its training seed, so ``classifier_nets`` of them
(seeds ``seed``, ``seed + 1``, ...) are trained and their features
concatenated. They train with a fixed torch thread count (the caller's is
restored), so the cached networks -- keyed by the data, labels, settings,
torch version and CPU capability -- are the same whatever threads the run
uses. Their held-out accuracy is reported beside the metrics. Two views of
those features are scored:

- *content* features (``fd``, ``kid``, precision/recall, ``feature_copy_rate``):
  each network's feature vector scaled to length sqrt(64). The length is the
  classifier's confidence; without it, what is left is *which* digit shape the
  image looks like. This is the view that puts blurred digits between real
  ones and noise, as a person would (the reference test shows it);
- *classifier* features (``fd_classifier``): the raw features, each network's
  divided by its training features' RMS length. Confidence counts here, so it
  separates near-real generators (a pixel-space Gaussian mixture vs real
  digits) that the content view calls equal -- but it ranks blurred digits
  below noise, since a blurred digit is recognised with low confidence.

Numbers are comparable within one data set and classifier, never with
published Inception FIDs or across data sets.

Metrics of ``n`` generated images against the real training images, with
``n`` = the number of held-out real images, so the real-vs-real floor (the
held-out images scored as if generated) is computed like for like:

- ``fd`` / ``fd_classifier``: Fréchet distance between Gaussians fitted to the
  two feature sets (Dowson & Landau 1982; the FID formula). Lower is better;
  the floor is > 0 because of finite samples.
- ``kid``: kernel inception distance (Bińkowski et al. 2018,
  https://arxiv.org/abs/1801.01401): the unbiased estimate of MMD^2 with the
  cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
  subsets. Unbiased, so real-vs-real is ~0 (it can be slightly negative).
- ``precision`` / ``recall``: improved precision and recall (Kynkäänniemi et
  al. 2019, https://arxiv.org/abs/1904.06991): the real (fake) manifold is the
  union of balls around each real (fake) feature vector reaching its k-th
  nearest neighbour; precision = share of fakes inside the real manifold
  (quality), recall = share of reals inside the fake manifold (coverage).
- ``class_entropy``: entropy (bits) of the predicted classes (the networks'
  mean probabilities) over the samples; log2(classes) when every class is
  equally common, 0 when the model makes one class only (mode collapse).
- Memorisation. ``nn_distance``: mean RMS pixel distance from each sample to
  its nearest training image, *over translations of the training images by up
  to ``max_shift`` pixels* (so a shifted copy is still a copy);
  ``near_copy_rate``: share of samples closer (so) to a training image than
  95% of held-out real images are; ``feature_copy_rate``: the same in content
  features. Both are calibrated on the held-out images (real data scores 0.05);
  a model that copies its training set scores far above.

Uncertainty: each stage scores ``sampling_seeds`` fresh sample sets of a
model and reports each metric's mean with a t-based 95% confidence interval
over them (``summarise``, ``interval``); two models whose intervals overlap are not told
apart by that metric at that number of seeds.

Restoration (the diffusion stage): ``psnr_ssim`` -- PSNR in dB for pixels in
[0, 1], and SSIM (Wang et al. 2004) from scikit-image.
"""

from __future__ import annotations

import contextlib
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

FEATURE_NET_VERSION = 2  # bump when FeatureNet or its training changes: old caches stop matching


@dataclass
class ImageMetricsConfig:
    """How generated images are scored (keep it the same for every model compared)."""

    k: int = opt(3, "neighbours that set the precision/recall manifold radii (Kynkäänniemi et al. use 3)")
    classifier_epochs: int = opt(30, "epochs of each feature classifier's training (once per data set, cached)")
    classifier_nets: int = opt(3, "feature classifiers (seeds seed, seed+1, ...) whose features are concatenated: "
                                  "one network's metrics moved with its training seed")
    classifier_threads: int = opt(1, "torch threads the feature classifiers train with, whatever the stage uses "
                                     "(the result depends on it; the stage's setting is restored afterwards)")
    classifier_cache: str | None = opt(None, "feature-classifier cache dir (default: $RLHF_CACHE/feature_nets, "
                                             "else ~/.cache/rlhf/feature_nets)")
    sampling_seeds: int = opt(5, "fresh sample sets (n = held-out count each) per model at the end of a stage; "
                                 "every metric is reported as mean and t-based 95% interval over them")
    kid_subsets: int = opt(100, "KID: random subsets averaged over (one pass when a subset would be everything)")
    kid_subset_size: int = opt(1000, "KID: images per subset (capped at the sample count)")
    max_shift: int = opt(2, "memorisation: training images are also compared translated by up to this many pixels")

    def check(self, fail):
        require_positive(self, fail, "k", "classifier_epochs", "classifier_nets", "classifier_threads",
                         "sampling_seeds", "kid_subsets")
        if self.kid_subset_size < 2:
            raise fail("kid_subset_size", f"expected an integer >= 2, got {self.kid_subset_size}")
        if self.max_shift < 0:
            raise fail("max_shift", f"expected 0 or a positive integer, got {self.max_shift}")


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


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, eq. 3) with the cubic polynomial kernel
    k(a, b) = (a.b / d + 1)^3 of KID: the means of k over distinct pairs within x
    and within y, minus twice its mean over all cross pairs. Shape: (m, d), (m', d) -> float."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def kernel_distance(fake: np.ndarray, real: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> float:
    """KID (Bińkowski et al. 2018, as in their code and torch-fidelity): the mean
    of ``polynomial_mmd2`` over ``subsets`` random subsets of ``subset_size`` rows
    of each set (drawn without replacement; capped at the smaller set). When a
    subset would be all of both sets, every subset is the same: one pass.
    Shape: (m, d), (n, d) -> float."""
    size = min(subset_size, len(fake), len(real))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(fake)} and {len(real)}")
    if size == len(fake) == len(real):
        return polynomial_mmd2(fake, real)
    rng = np.random.default_rng(seed)
    return float(np.mean([polynomial_mmd2(fake[rng.choice(len(fake), size, replace=False)],
                                          real[rng.choice(len(real), size, replace=False)])
                          for _ in range(subsets)]))


def translate(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Images moved by (dy, dx) pixels, the uncovered border filled with 0 (not
    wrapped around, unlike ``torch.roll``). Shape: (n, c, h, w) -> same."""
    out = torch.zeros_like(images)
    h, w = images.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def shifted_nearest_distance(queries: torch.Tensor, refs: torch.Tensor, max_shift: int) -> torch.Tensor:
    """RMS pixel distance from each query to its nearest ref *translated by up to
    ``max_shift`` pixels* in each direction (``translate``; 0 = plain nearest
    neighbour): a copy of a training image moved by a pixel or two is as near as
    the image itself. One translation at a time, so memory stays that of one
    copy of ``refs``. Shape: (q, c, h, w), (r, c, h, w) -> (q,)."""
    best = torch.full((len(queries),), float("inf"), dtype=torch.float64)
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            best = torch.minimum(best, nearest_neighbours(queries, translate(refs, dy, dx))[0])
    return best


def feature_nearest_distance(queries: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Euclidean distance from each query feature vector to its nearest ref. Shape: (q, d), (r, d) -> (q,)."""
    q = torch.as_tensor(np.asarray(queries), dtype=torch.float64)
    r = torch.as_tensor(np.asarray(refs), dtype=torch.float64)
    out = torch.empty(len(q), dtype=torch.float64)
    for rows, d in _distances(q, r):
        out[rows] = d.min(1).values
    return out.numpy()


class Interval(NamedTuple):
    """A metric over sampling seeds: mean, t-based 95% confidence interval of the
    mean, sample standard deviation, the per-seed values."""

    mean: float
    low: float
    high: float
    sd: float
    values: tuple[float, ...]


def interval(values, confidence: float = 0.95) -> Interval:
    """Mean and the Student-t confidence interval mean ± t_(1+c)/2,k-1 · sd / sqrt(k)
    over k per-seed values (seeds are independent draws, the metric roughly normal
    across them). One value: no interval (low = high = nan). Shape: (k,) -> Interval."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("interval of no values")
    mean = float(v.mean())
    if v.size == 1:
        return Interval(mean, math.nan, math.nan, math.nan, (mean,))
    sd = float(v.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1)) * sd / math.sqrt(v.size)
    return Interval(mean, mean - half, mean + half, sd, tuple(float(x) for x in v))


def overlap(a: Interval, b: Interval) -> bool:
    """Whether two intervals share a point (a single value counts as the interval [v, v])."""
    lo_a, hi_a = (a.mean, a.mean) if math.isnan(a.low) else (a.low, a.high)
    lo_b, hi_b = (b.mean, b.mean) if math.isnan(b.low) else (b.low, b.high)
    return lo_a <= hi_b and lo_b <= hi_a


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


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch intra-op threads, then restore the caller's count.

    Why: a CPU convolution's float sums are split across threads, so the same
    seeded training gives different networks at different thread counts (the
    differences grow over training); a fixed count makes the cached classifier
    the same on every machine with the same torch build and CPU type."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pseudo_labels(images: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """Unlabelled data: k-means cluster ids of the pixels stand in for classes."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    flat = images.reshape(len(images), -1).numpy()
    with threadpool_limits(limits=1):  # same clusters whatever the machine's thread count (see torch_threads)
        return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(flat)


def _cache_dir(cfg: ImageMetricsConfig) -> Path:
    if cfg.classifier_cache:
        return Path(cfg.classifier_cache)
    root = os.environ.get("RLHF_CACHE") or Path.home() / ".cache" / "rlhf"
    return Path(root) / "feature_nets"


def _cache_key(data: ImageData, labels: np.ndarray, cfg: ImageMetricsConfig, seed: int) -> str:
    """Everything the trained network depends on: our code's version, its settings,
    the thread count it trains with, torch's version and the CPU kernels torch
    picks (AVX2, AVX512, ...; they round differently), the images and labels."""
    h = hashlib.sha256()
    h.update(f"v{FEATURE_NET_VERSION}|epochs={cfg.classifier_epochs}|seed={seed}|threads={cfg.classifier_threads}|"
             f"torch={torch.__version__}|cpu={torch.backends.cpu.get_cpu_capability()}|".encode())
    h.update(str(tuple(data.train.shape)).encode())
    h.update(data.train.numpy().tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Each image blurred with its own Gaussian (std ``sigma[i]`` pixels; a
    (2 radius + 1)-tap kernel, zero padding). Shape: (b, c, h, w), (b,) -> same."""
    b, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k1 = torch.exp(-taps[None] ** 2 / (2 * sigma[:, None].to(x.dtype) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :]).repeat_interleave(c, 0)[:, None]  # (b c, 1, k, k)
    out = nn.functional.conv2d(x.reshape(1, b * c, h, w), k2, padding=radius, groups=b * c)
    return out.reshape(b, c, h, w)


def _augment(xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Training augmentation: the batch moved by up to one pixel, and half its
    images blurred (std 0.5-1.2 px), so the features care about which digit is
    drawn more than about exact pixel positions or sharpness. No added noise:
    a classifier taught to ignore pixel noise cannot tell noisy samples from
    clean ones."""
    dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
    xb = translate(xb, dy, dx)
    sigma = 0.5 + 0.7 * torch.rand(len(xb), generator=gen)
    blur = torch.rand(len(xb), generator=gen) < 0.5
    return torch.where(blur[:, None, None, None], gaussian_blur(xb, sigma), xb)


def _train_feature_net(x: torch.Tensor, y: np.ndarray, num_classes: int, epochs: int, seed: int,
                       threads: int = 1) -> FeatureNet:
    with torch_threads(threads):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = FeatureNet(x.shape[1], num_classes)
        opt_ = torch.optim.Adam(net.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt_, T_max=epochs)
        labels = torch.as_tensor(y, dtype=torch.long)
        net.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=gen).split(64):
                loss = nn.functional.cross_entropy(net(_augment(x[idx], gen))[1], labels[idx])
                opt_.zero_grad()
                loss.backward()
                opt_.step()
            sched.step()
    return net.eval()


@torch.no_grad()
def _embed(net: FeatureNet, x: torch.Tensor, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw features and class probabilities. Shape: (n, c, h, w) -> (n, 64), (n, classes)."""
    net.eval()
    feats, probs = [], []
    for i in range(0, len(x), batch_size):
        f, logits = net(x[i:i + batch_size].float())
        feats.append(f)
        probs.append(logits.softmax(1))
    return torch.cat(feats).double(), torch.cat(probs).double()


class FeatureClassifier(NamedTuple):
    net: FeatureNet  # the first of ``nets`` (its ``embed`` gives one network's features and classes)
    num_classes: int
    key: str
    held_out_accuracy: float  # of the networks' mean probabilities
    labels_from: str  # "labels" or "k-means"
    nets: tuple[FeatureNet, ...] = ()
    train_rms: tuple[float, ...] = ()  # each network's RMS training-feature length (scales fd_classifier's view)

    def features(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(content features, classifier features, predicted classes) of ``images`` in [0, 1]:
        every network's features concatenated, each scaled to length sqrt(64)
        (content) or divided by ``train_rms`` (classifier); classes from the
        networks' mean probabilities. Shape: (n, c, h, w) -> (n, 64 N), (n, 64 N), (n,)."""
        nets = self.nets or (self.net,)
        rms = self.train_rms or (1.0,) * len(nets)
        content, raw, probs = [], [], 0
        for net, scale in zip(nets, rms):
            f, p = _embed(net, images)
            content.append(f / f.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(f.shape[1]))
            raw.append(f / scale)
            probs = probs + p
        return torch.cat(content, 1).numpy(), torch.cat(raw, 1).numpy(), probs.argmax(1).numpy()


def _load_or_train(data: ImageData, y: np.ndarray, k: int, cfg: ImageMetricsConfig, seed: int,
                   source: str) -> tuple[FeatureNet, str]:
    """One feature network: from the cache, or trained and cached (atomically: a concurrent run that
    got there first wins)."""
    from safetensors.torch import load_file, save_file

    key = _cache_key(data, y, cfg, seed)
    where = _cache_dir(cfg) / key
    net = FeatureNet(data.train.shape[1], k)
    if (where / "model.safetensors").is_file() and (where / "info.json").is_file():
        net.load_state_dict(load_file(where / "model.safetensors"))
        log.info("feature classifier: cached %s", where)
        return net.eval(), key
    log.info("feature classifier (seed %d): training on %d images (%d epochs, %d threads), cached at %s", seed,
             len(data.train), cfg.classifier_epochs, cfg.classifier_threads, where)
    net = _train_feature_net(data.train, y, k, cfg.classifier_epochs, seed, cfg.classifier_threads)
    tmp = where.with_name(f".{key}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), tmp / "model.safetensors")
    (tmp / "info.json").write_text(json.dumps({
        "classes": k, "labels_from": source, "data": data.description, "epochs": cfg.classifier_epochs,
        "seed": seed, "threads": cfg.classifier_threads, "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(), "version": FEATURE_NET_VERSION}, indent=2) + "\n")
    try:
        tmp.rename(where)
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return net, key


def feature_classifier(data: ImageData, cfg: ImageMetricsConfig, seed: int = 0) -> FeatureClassifier:
    """The ``cfg.classifier_nets`` feature networks for ``data`` (seeds ``seed``, ``seed + 1``, ...),
    each loaded from the cache or trained once and cached.

    Labelled data trains on its labels; unlabelled data on k-means(10) cluster ids.
    """
    if data.train_labels is not None:
        y, held_y, k, source = data.train_labels.numpy(), data.held_labels.numpy(), data.num_classes, "labels"
    else:
        k, source = 10, "k-means"
        y = _pseudo_labels(data.train, k, seed)
        held_y = None
    nets, keys = zip(*(_load_or_train(data, y, k, cfg, seed + i, source) for i in range(cfg.classifier_nets)))
    key = keys[0] if len(keys) == 1 else hashlib.sha256("|".join(keys).encode()).hexdigest()[:16]
    rms = tuple(float(_embed(net, data.train)[0].pow(2).sum(1).mean().sqrt()) for net in nets)
    clf = FeatureClassifier(nets[0], k, key, float("nan"), source, tuple(nets), rms)
    if held_y is not None:
        clf = clf._replace(held_out_accuracy=float((clf.features(data.held)[2] == held_y).mean()))
        log.info("feature classifiers: %d, held-out accuracy %.3f", len(nets), clf.held_out_accuracy)
    return clf


# ---------------------------------------------------------------- scoring a model against real data


class RealReference(NamedTuple):
    """Everything generated images are compared against, computed once per stage."""

    data: ImageData
    classifier: FeatureClassifier
    train_features: np.ndarray  # content features of the training images
    held_threshold: float  # 5th percentile of held-out images' (shift-aware) nearest-train pixel distance
    k: int
    train_classifier_features: np.ndarray
    feature_threshold: float  # 5th percentile of held-out images' nearest-train content-feature distance
    cfg: ImageMetricsConfig

    @property
    def n(self) -> int:
        return len(self.data.held)


def real_reference(data: ImageData, cfg: ImageMetricsConfig, seed: int = 0) -> RealReference:
    clf = feature_classifier(data, cfg, seed)
    train_content, train_raw, _ = clf.features(data.train)
    held_content = clf.features(data.held)[0]
    held_nn = shifted_nearest_distance(data.held, data.train, cfg.max_shift)
    held_feat_nn = feature_nearest_distance(held_content, train_content)
    return RealReference(data, clf, train_content, float(np.quantile(held_nn.numpy(), 0.05)), cfg.k, train_raw,
                         float(np.quantile(held_feat_nn, 0.05)), cfg)


def score(images: torch.Tensor, ref: RealReference) -> dict[str, float]:
    """The shared metrics of ``images`` (in [0, 1], Shape (n, c, h, w)) against the real training set."""
    images = images.float().clamp(0, 1)
    content, raw, preds = ref.classifier.features(images)
    precision, recall = precision_recall(ref.train_features, content, ref.k)
    nn_dist = shifted_nearest_distance(images, ref.data.train, ref.cfg.max_shift)
    feat_nn = feature_nearest_distance(content, ref.train_features)
    return {
        "fd": frechet_distance_of(content, ref.train_features),
        "kid": kernel_distance(content, ref.train_features, ref.cfg.kid_subsets, ref.cfg.kid_subset_size),
        "fd_classifier": frechet_distance_of(raw, ref.train_classifier_features),
        "precision": precision,
        "recall": recall,
        "class_entropy": class_entropy(preds, ref.classifier.num_classes),
        "nn_distance": float(nn_dist.mean()),
        "near_copy_rate": float((nn_dist < ref.held_threshold).double().mean()),
        "feature_copy_rate": float((feat_nn < ref.feature_threshold).mean()),
    }


def summarise(scores: list[dict[str, float]]) -> dict[str, Interval]:
    """Per-seed score dicts -> each metric's ``interval`` over the seeds."""
    return {key: interval([s[key] for s in scores]) for key in scores[0]}


def noise_baseline(data: ImageData, n: int, seed: int) -> torch.Tensor:
    """The trivial generator: per-pixel Gaussian noise with the training data's
    per-pixel mean and standard deviation, clipped to [0, 1]. Shape: (n, c, h, w)."""
    gen = torch.Generator().manual_seed(seed)
    mean, std = data.train.mean(0), data.train.std(0)
    return (mean + std * torch.randn((n, *mean.shape), generator=gen)).clamp(0, 1)


def reference_rows(ref: RealReference, seed: int, seeds: int = 1) -> dict[str, dict[str, Interval]]:
    """The floor (the held-out real images scored as if generated: one fixed set, so no interval) and
    the trivial noise baseline (``seeds`` fresh draws, seeds ``seed``, ``seed + 1``, ...)."""
    return {"real held-out (floor)": summarise([score(ref.data.held, ref)]),
            "per-pixel Gaussian noise": summarise([score(noise_baseline(ref.data, ref.n, seed + i), ref)
                                                   for i in range(seeds)])}


def max_class_entropy(ref: RealReference) -> float:
    return math.log2(ref.classifier.num_classes)
