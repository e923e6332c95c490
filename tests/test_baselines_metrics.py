"""Baselines, pure functions: image metrics against hand-computed cases, the image
readers (IDX, folder, hub) on tiny files made here, restoration scores."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch

from rlhf.baselines import image_metrics as M
from rlhf.baselines.images import ImageDataConfig, load_images, read_idx, to_uint8_grid
from rlhf.errors import BadInput

# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_identical_sets_is_zero():
    x = np.random.default_rng(0).normal(size=(200, 8))
    assert M.frechet_distance_of(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_shifted_samples_is_the_squared_shift():
    # Same samples shifted by delta: identical covariances, so the trace term vanishes exactly.
    x = np.random.default_rng(1).normal(size=(500, 4))
    delta = np.array([1.0, -2.0, 0.5, 0.0])
    assert M.frechet_distance_of(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-6)


def test_frechet_distance_closed_form_for_gaussians():
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    expected = 1.0 + 0.0 + 4.0 + sum(a + b - 2 * math.sqrt(a * b) for a, b in zip(s1, s2))
    assert M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # 1-D: N(0, 1) vs N(1, 2^2) -> 1 + (1 - 2)^2 = 2.
    assert M.frechet_distance(np.zeros(1), np.eye(1), np.ones(1), 4 * np.eye(1)) == pytest.approx(2.0)


def test_frechet_distance_of_large_gaussian_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 1.0, size=(20000, 2))
    b = rng.normal([3.0, 0.0], [1.0, 2.0], size=(20000, 2))
    assert M.frechet_distance_of(a, b) == pytest.approx(9.0 + 1.0, rel=0.03)


# ---------------------------------------------------------------- precision / recall and friends


def test_knn_radii_by_hand():
    x = np.array([[0.0], [1.0], [3.0], [7.0]])
    # 1st neighbour: 1, 1, 2, 4; 2nd neighbour: 3, 2, 3, 6.
    assert M.knn_radii(x, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert M.knn_radii(x, 2).tolist() == [3.0, 2.0, 3.0, 6.0]


def test_precision_recall_of_identical_sets_is_one():
    x = np.random.default_rng(3).normal(size=(100, 5))
    assert M.precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_of_far_apart_sets_is_zero_and_of_a_subset_is_asymmetric():
    rng = np.random.default_rng(4)
    real = rng.normal(size=(200, 2))
    assert M.precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    # A "mode-collapsed" generator: the real points of one region only. All
    # inside the real manifold (precision 1), covering little of it (low recall).
    precision, recall = M.precision_recall(real, real[real[:, 0] > 1.0], k=3)
    assert precision == 1.0 and recall < 0.4


def test_class_entropy():
    assert M.class_entropy(np.arange(100) % 10, 10) == pytest.approx(math.log2(10))
    assert M.class_entropy(np.full(50, 3), 10) == 0.0
    assert M.class_entropy(np.array([0, 0, 1, 1]), 10) == pytest.approx(1.0)


def test_nearest_neighbours_rms_distance_and_index():
    refs = torch.zeros(3, 1, 2, 2)
    refs[1] += 1.0
    refs[2] += 0.5
    queries = torch.full((2, 1, 2, 2), 0.9)
    queries[1] = 0.0
    dist, idx = M.nearest_neighbours(queries, refs)
    assert idx.tolist() == [1, 0]
    assert dist.tolist() == pytest.approx([0.1, 0.0])


def test_noise_baseline_matches_per_pixel_statistics():
    train = torch.rand(400, 1, 4, 4) * 0.5 + 0.25  # stays inside [0, 1] after noise, mostly
    data = M.ImageData(train, None, train[:10], None, 0, "test")
    noise = M.noise_baseline(data, 5000, seed=0)
    assert noise.shape == (5000, 1, 4, 4)
    assert torch.allclose(noise.mean(0), train.mean(0), atol=0.02)
    assert torch.equal(noise[:3], M.noise_baseline(data, 5000, seed=0)[:3])  # seeded


# ---------------------------------------------------------------- restoration scores


def test_psnr_ssim_known_values():
    clean = torch.rand(3, 1, 8, 8)
    psnr, ssim = M.psnr_ssim(clean, clean)
    assert psnr == pytest.approx(100.0) and ssim == pytest.approx(1.0)
    shifted = (clean + 0.1).clamp(max=10)  # MSE exactly 0.01 -> 20 dB
    assert M.psnr_ssim(clean, shifted)[0] == pytest.approx(20.0, abs=1e-6)
    known = M.central_hole((2, 1, 8, 8), 0.5)
    assert known.shape == (2, 1, 8, 8) and known.sum().item() == 2 * (64 - 16)
    assert known[0, 0, 2:6, 2:6].sum() == 0 and known[0, 0, 0].all()
    # PSNR restricted to the hole ignores errors outside it.
    wrong_outside = clean.clone()[:2]
    wrong_outside[known.bool().expand_as(wrong_outside)] += 0.5
    assert M.psnr_ssim(clean[:2], wrong_outside, 1 - known)[0] == pytest.approx(100.0)


# ---------------------------------------------------------------- image sources


def _write_idx(path, array: np.ndarray, gz: bool = True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_idx_files_read_with_sibling_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(30, 6, 6))
    labels = np.arange(30) % 3
    img_path = _write_idx(tmp_path / "t-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(img_path), images)
    data = load_images(ImageDataConfig(source=str(img_path), eval_fraction=0.2), seed=0)
    assert data.train.shape == (24, 1, 6, 6) and data.held.shape == (6, 1, 6, 6)
    assert data.num_classes == 3 and data.train_labels is not None
    assert 0.0 <= data.train.min() and data.train.max() <= 1.0
    resized = load_images(ImageDataConfig(source=str(img_path), image_size=8), seed=0)
    assert resized.train.shape[1:] == (1, 8, 8)


def test_bad_idx_file_is_bad_input(tmp_path):
    bad = tmp_path / "x-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(BadInput, match="bad magic number"):
        read_idx(bad)
    with pytest.raises(BadInput, match="no such file or folder"):
        load_images(ImageDataConfig(source=str(tmp_path / "missing-images-idx3-ubyte.gz")), seed=0)


def test_image_folder_with_class_subfolders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    data = load_images(ImageDataConfig(source=str(tmp_path), channels=3, image_size=8), seed=0)
    assert data.num_classes == 2 and data.train.shape[1:] == (3, 8, 8)
    assert len(data.train) + len(data.held) == 12


def test_hub_dataset_by_name(monkeypatch):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(2)
    rows = {"image": [Image.fromarray(rng.integers(0, 256, size=(8, 8), dtype=np.uint8)) for _ in range(20)],
            "label": [i % 4 for i in range(20)]}
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_images(ImageDataConfig(source="someone/tiny-digits", split="test"), seed=0)
    assert calls == [("someone/tiny-digits", "test")]
    assert data.num_classes == 4 and data.train.shape[1:] == (1, 8, 8)


def test_digits_default_is_embedded_and_split_deterministically():
    a = load_images(ImageDataConfig(), seed=5)
    b = load_images(ImageDataConfig(), seed=5)
    assert a.train.shape[1:] == (1, 8, 8) and len(a.train) + len(a.held) == 1797
    assert torch.equal(a.held, b.held) and a.num_classes == 10


def test_grid_shape():
    grid = to_uint8_grid(torch.rand(10, 1, 8, 8), nrow=4, pad=1, scale=2)
    assert grid.shape == (3 * 17 + 1, 4 * 17 + 1, 3) and grid.dtype == np.uint8


# ---------------------------------------------------------------- KID, intervals, shift-aware memorisation


def test_polynomial_mmd2_by_hand():
    # d = 1, k(a, b) = (ab + 1)^3. Within x = {1, 2}: k(1, 2) = 27; within y = {0, 1}: k(0, 1) = 1;
    # across: k(1, 0) = 1, k(1, 1) = 8, k(2, 0) = 1, k(2, 1) = 27 -> mean 9.25. MMD^2 = 27 + 1 - 2 * 9.25.
    x, y = np.array([[1.0], [2.0]]), np.array([[0.0], [1.0]])
    assert M.polynomial_mmd2(x, y) == pytest.approx(9.5)
    assert M.polynomial_mmd2(x, y) == pytest.approx(M.polynomial_mmd2(y, x))


def test_kernel_distance_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same = M.kernel_distance(a, b)
    assert same == pytest.approx(M.polynomial_mmd2(a, b))  # subsets would be everything: one pass
    shifted = M.kernel_distance(a, b + 0.5)
    assert abs(same) < 0.05 * shifted
    # Unequal sizes: averaged over random subsets of the smaller size, seeded.
    sub = M.kernel_distance(a[:300], b + 0.5, subsets=20, subset_size=1000, seed=1)
    assert sub == M.kernel_distance(a[:300], b + 0.5, subsets=20, subset_size=1000, seed=1)
    assert sub == pytest.approx(shifted, rel=0.2)


def test_translate_fills_with_zeros():
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    assert M.translate(x, 0, 1)[0, 0].tolist() == [[0, 1, 2], [0, 4, 5], [0, 7, 8]]
    assert M.translate(x, -1, 0)[0, 0].tolist() == [[4, 5, 6], [7, 8, 9], [0, 0, 0]]
    assert torch.equal(M.translate(x, 0, 0), x)


def test_shifted_nearest_distance_sees_through_small_translations():
    refs = torch.zeros(2, 1, 6, 6)
    refs[0, 0, 2, 2] = 1.0
    refs[1, 0, 1:5, 3] = 1.0
    moved = M.translate(refs[:1], 1, -2)  # the dot, two pixels left and one down
    # Two dots apart differ in 2 of 36 pixels (the line is further); only a 2-pixel shift lines them up.
    for max_shift in (0, 1):
        assert M.shifted_nearest_distance(moved, refs, max_shift).item() == pytest.approx(math.sqrt(2 / 36))
    assert M.shifted_nearest_distance(moved, refs, 2).item() == 0.0


def test_feature_nearest_distance():
    refs = np.array([[0.0, 0.0], [3.0, 4.0]])
    assert M.feature_nearest_distance(np.array([[3.0, 0.0], [3.0, 5.0]]), refs).tolist() == [3.0, 1.0]


def test_interval_is_the_t_based_95_percent_ci_of_the_mean():
    iv = M.interval([1.0, 2.0, 3.0])
    # sd 1, t(0.975, 2 df) = 4.302653: half-width 4.302653 / sqrt(3).
    assert (iv.mean, iv.sd) == (2.0, 1.0)
    assert iv.high - iv.mean == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert iv.mean - iv.low == pytest.approx(iv.high - iv.mean)
    one = M.interval([5.0])
    assert one.mean == 5.0 and math.isnan(one.low) and math.isnan(one.high)
    assert M.overlap(M.interval([1.0, 2.0, 3.0]), one) is False
    assert M.overlap(iv, M.interval([4.0])) is True  # 4 is inside [2 - 2.48, 2 + 2.48]
    assert M.summarise([{"fd": 1.0}, {"fd": 3.0}])["fd"].mean == 2.0


def test_gaussian_blur_keeps_an_interior_dot_s_mass_and_spreads_it_symmetrically():
    x = torch.zeros(2, 1, 9, 9)
    x[:, 0, 4, 4] = 1.0
    out = M.gaussian_blur(x, torch.tensor([0.5, 1.2]))
    assert out.sum((1, 2, 3)).tolist() == pytest.approx([1.0, 1.0])
    assert torch.allclose(out, out.flip(-1)) and torch.allclose(out, out.transpose(-1, -2))
    assert out[1, 0, 4, 4] < out[0, 0, 4, 4]  # the wider blur leaves less in the middle


def test_feature_net_training_ignores_the_callers_thread_count():
    from rlhf.baselines.images import ImageDataConfig, load_images

    d = load_images(ImageDataConfig(max_images=160), seed=0)
    before = torch.get_num_threads()
    nets = []
    try:
        for caller in (1, 2):
            torch.set_num_threads(caller)
            nets.append(M._train_feature_net(d.train, d.train_labels.numpy(), 10, epochs=1, seed=0, threads=1))
            assert torch.get_num_threads() == caller  # restored
    finally:
        torch.set_num_threads(before)
    a, b = (n.state_dict() for n in nets)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_key_covers_what_changes_the_network():
    d = M.ImageData(torch.zeros(4, 1, 4, 4), None, torch.zeros(1, 1, 4, 4), None, 0, "test")
    y = np.zeros(4, dtype=np.int64)
    cfg = M.ImageMetricsConfig()
    key = M._cache_key(d, y, cfg, 0)
    assert key == M._cache_key(d, y, M.ImageMetricsConfig(sampling_seeds=9), 0)  # scoring-only settings
    for other in (M.ImageMetricsConfig(classifier_threads=2), M.ImageMetricsConfig(classifier_epochs=5)):
        assert M._cache_key(d, y, other, 0) != key
    assert M._cache_key(d, y, cfg, 1) != key and M._cache_key(d, y + 1, cfg, 0) != key


def test_metrics_config_bad_values_name_the_key():
    from rlhf.config import build

    with pytest.raises(BadInput, match="sampling_seeds"):
        build(M.ImageMetricsConfig, {"sampling_seeds": 0}, "stages.gan.metrics")
