"""The sample metrics (urepa.metrics) against closed forms, brute force and the reference implementations
(clean-fid, torch-fidelity); every documented parameter changes the result the way its documentation says.
(The feature networks: tests/test_feature_networks.py.)"""
import numpy as np
import pytest
import torch
from cleanfid.fid import kernel_distance
from PIL import Image

from conftest import write_images
from urepa import metrics as metrics_module
from urepa.feature_networks import INCEPTION_NAME, StandInFeatures, build_feature_network
from urepa.metrics import (
    compute_metrics,
    extract_features,
    feature_statistics,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_statistics,
    precision_recall,
    save_statistics,
    set_statistics,
)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(500, 16))
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_non_commuting_covariances_matches_hand_computation():
    # For 2 x 2 M = sigma1 sigma2 (positive eigenvalues l1, l2): tr sqrt(M) = sqrt(l1) + sqrt(l2)
    # = sqrt(tr M + 2 sqrt(det M)).
    sigma1 = np.array([[2.0, 1.0], [1.0, 2.0]])
    sigma2 = np.array([[1.0, 0.0], [0.0, 4.0]])
    product = sigma1 @ sigma2
    tr_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    expected = 13.0 + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_survives_rank_deficient_covariances():
    rng = np.random.default_rng(2)  # fewer samples than dimensions, as in the smoke tier
    mu1, sigma1 = feature_statistics(rng.normal(size=(10, 40)))
    mu2, sigma2 = feature_statistics(rng.normal(size=(10, 40)) + 1)
    distance = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert np.isfinite(distance) and distance > 0
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-4)


def test_features_dead_in_a_set_change_nothing_and_warn_of_nothing():
    """ReLU units that never fire (zero for every image of a set, as the smoke tier's random networks have) make
    the covariances exactly singular. The distance is what an independent computation of the root's trace gives
    (the eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1), by symmetric eigendecompositions), and scipy's "Matrix is
    singular" warning does not fire."""
    import warnings

    def psd_root(sigma):
        values, vectors = np.linalg.eigh(sigma)
        return vectors @ np.diag(np.sqrt(np.clip(values, 0, None))) @ vectors.T

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(64, 12)), rng.normal(size=(64, 12)) + 0.5
    a[:, 4] = b[:, 4] = 0  # dead in both sets
    a[:, 7] = 0  # dead in one
    (mu_a, sigma_a), (mu_b, sigma_b) = feature_statistics(a), feature_statistics(b)
    root_a = psd_root(sigma_a)
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ sigma_b @ root_a), 0, None)).sum()
    expected = np.sum((mu_a - mu_b) ** 2) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_root
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert frechet_distance(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    for mu2, sigma1, sigma2 in [(np.zeros(4), np.eye(3), np.eye(3)),  # means differ
                                (np.zeros(3), np.eye(3), np.eye(4)),  # covariances differ
                                (np.zeros(3), np.eye(4), np.eye(4))]:  # covariances do not fit the means
        with pytest.raises(ValueError, match="mismatched statistics"):
            frechet_distance(np.zeros(3), sigma1, mu2, sigma2)


def _frechet_with_root(monkeypatch, roots, mu1, sigma1, mu2, sigma2):
    """frechet_distance with scipy's sqrtm replaced by `roots` (called in turn); returns the distance and the
    matrices sqrtm was asked for."""
    import types

    asked = []
    monkeypatch.setattr(metrics_module, "linalg", types.SimpleNamespace(
        sqrtm=lambda matrix: asked.append(matrix) or roots[len(asked) - 1](matrix)))
    return frechet_distance(mu1, sigma1, mu2, sigma2), asked


def test_a_non_finite_root_is_retried_with_eps_on_both_diagonals(monkeypatch):
    from scipy import linalg

    sigma1, sigma2 = np.array([[2.0, 1.0], [1.0, 2.0]]), np.array([[1.0, 0.0], [0.0, 4.0]])
    mu1, mu2 = np.array([0.0, 1.0]), np.array([3.0, -1.0])
    with pytest.warns(UserWarning, match="singular covariance product; adding 1e-06 to the diagonals"):
        distance, asked = _frechet_with_root(monkeypatch, [lambda m: np.full_like(m, np.inf), linalg.sqrtm],
                                             mu1, sigma1, mu2, sigma2)
    offset = 1e-6 * np.eye(2)
    np.testing.assert_array_equal(asked[1], (sigma1 + offset) @ (sigma2 + offset))
    expected = 13.0 + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(linalg.sqrtm(asked[1]))
    assert distance == pytest.approx(expected, rel=1e-12)


def test_a_negligible_imaginary_part_of_the_root_is_dropped_and_a_large_one_refused(monkeypatch):
    import warnings

    from scipy import linalg

    sigma = np.array([[2.0, 1.0], [1.0, 2.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no complex-to-real cast left to numpy
        distance, _ = _frechet_with_root(monkeypatch, [lambda m: linalg.sqrtm(m) + 1e-4j], np.zeros(2), sigma,
                                         np.ones(2), sigma)
    assert isinstance(distance, float) and distance == pytest.approx(2.0, abs=1e-9)
    with pytest.raises(ValueError, match="imaginary component 0.01"):
        _frechet_with_root(monkeypatch, [lambda m: linalg.sqrtm(m) + 0.01j], np.zeros(2), sigma, np.ones(2), sigma)


# ---------------------------------------------------------------- KID


def test_kid_of_identical_sets_is_its_closed_form_and_matches_clean_fid():
    features = np.random.default_rng(3).normal(size=(60, 8))
    # Subsets of the full size are permutations of the same set: with mean off-diagonal kernel a and
    # mean diagonal kernel b, the unbiased MMD² is 2 (a - b) / m exactly, on every subset.
    kernel = (features @ features.T / 8 + 1) ** 3
    m = len(features)
    mean_diagonal = np.trace(kernel) / m
    mean_off_diagonal = (kernel.sum() - np.trace(kernel)) / (m * (m - 1))
    kid_mean, kid_std = kernel_inception_distance(features, features, 5, 1000, seed=0)
    assert kid_mean == pytest.approx(2 * (mean_off_diagonal - mean_diagonal) / m, rel=1e-9)
    assert kid_std == pytest.approx(0, abs=1e-9)
    assert kid_mean == pytest.approx(kernel_distance(features, features, num_subsets=5), rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    shifted = rng.normal(size=(300, 16)) + 0.5
    same, _ = kernel_inception_distance(a, b, num_subsets=10, max_subset_size=200, seed=0)
    different, different_std = kernel_inception_distance(a, shifted, num_subsets=10, max_subset_size=200, seed=0)
    assert different > 10 * different_std > 0
    assert abs(same) < 0.05 * different


def test_kid_is_reproducible_with_a_seed():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(40, 4))
    assert kernel_inception_distance(a, b, 7, 20, seed=1) == kernel_inception_distance(a, b, 7, 20, seed=1)


def test_kid_is_computed_in_float64_whatever_the_features_dtype():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(50, 4)).astype(np.float32), rng.normal(size=(40, 4)).astype(np.float32)
    as_float64 = kernel_inception_distance(a.astype(np.float64), b.astype(np.float64), 3, 20, seed=0)
    assert kernel_inception_distance(a, b, 3, 20, seed=0) == as_float64
    assert kernel_inception_distance(a.astype(np.float64), b, 3, 20, seed=0) == as_float64


def test_statistics_and_inception_score_are_computed_in_float64_whatever_the_features_dtype():
    features = np.random.default_rng(5).normal(size=(30, 6)).astype(np.float32)
    for got, expected in zip(feature_statistics(features), feature_statistics(features.astype(np.float64))):
        assert got.dtype == np.float64 and np.array_equal(got, expected)
    assert inception_score(features, 3, seed=0) == inception_score(features.astype(np.float64), 3, seed=0)
    # the raw pool features a reference keeps (KID, precision / recall) are float32: 50k x 2048 is 400 MB
    stats = set_statistics({"pool": features.astype(np.float64), "spatial": features, "feature_network": "n"})
    assert stats["pool_features"].dtype == np.float32


def test_a_covariance_needs_two_feature_vectors():
    assert feature_statistics(np.eye(2))[1].shape == (2, 2)
    with pytest.raises(ValueError, match="need at least 2 feature vectors for a covariance, got 1"):
        feature_statistics(np.ones((1, 3)))


def test_kid_needs_two_samples_per_set():
    rng = np.random.default_rng(5)
    assert np.isfinite(kernel_inception_distance(rng.normal(size=(2, 4)), rng.normal(size=(9, 4)), 3, 20, seed=0)[0])
    with pytest.raises(ValueError, match="KID needs at least 2 samples per set, got 1 and 9"):
        kernel_inception_distance(rng.normal(size=(1, 4)), rng.normal(size=(9, 4)), 3, 20, seed=0)


def mmd_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, as sums over pairs."""
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3

    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return within - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2


def test_kid_subset_size_subsets_and_seed_each_change_the_estimate():
    rng = np.random.default_rng(5)
    gen, ref = rng.normal(size=(12, 4)), rng.normal(size=(12, 4)) + 0.3
    # subsets as large as the sets hold every sample: one value, whatever the seed and the count
    full = kernel_inception_distance(gen, ref, num_subsets=3, max_subset_size=12, seed=0)
    assert full[0] == pytest.approx(mmd_by_hand(gen, ref), rel=1e-9) and full[1] == pytest.approx(0, abs=1e-12)
    assert kernel_inception_distance(gen, ref, 3, 50, seed=4)[0] == pytest.approx(full[0], rel=1e-12)
    small = kernel_inception_distance(gen, ref, num_subsets=3, max_subset_size=5, seed=0)
    assert small[0] != pytest.approx(full[0], rel=1e-3) and small[1] > 0
    assert kernel_inception_distance(gen, ref, 3, 5, seed=1)[0] != small[0]
    assert kernel_inception_distance(gen, ref, 4, 5, seed=0)[0] != small[0]
    assert kernel_inception_distance(gen, ref, 1, 5, seed=0)[1] == 0.0


# ---------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = inception_score(np.zeros((100, 1008)), 10, seed=0)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def class_major_one_hot_logits(num_classes: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Fully confident logits in the order sample sets are written: image i is class i // per_class."""
    labels = np.arange(num_classes * per_class) // per_class
    return 40.0 * np.eye(num_classes)[labels], labels


def confident_split_scores(labels: np.ndarray, order: np.ndarray, num_splits: int) -> np.ndarray:
    """IS of each split of fully confident samples, by hand: KL(p(y|x) || p(y)) = -log p(y = label), so
    exp(mean KL) = exp(entropy of the split's class histogram)."""
    n = len(labels)
    scores = []
    for i in range(num_splits):
        counts = np.bincount(labels[order[i * n // num_splits:(i + 1) * n // num_splits]])
        share = counts[counts > 0] / counts.sum()
        scores.append(np.exp(-(share * np.log(share)).sum()))
    return np.array(scores)


@pytest.mark.parametrize("seed", [0, 3])
def test_inception_score_of_class_ordered_confident_samples_splits_a_seeded_permutation(seed):
    num_classes, per_class = 40, 25
    logits, labels = class_major_one_hot_logits(num_classes, per_class)
    mean, std = inception_score(logits, num_splits=10, seed=seed)
    expected = confident_split_scores(labels, np.random.RandomState(seed).permutation(len(labels)), 10)
    assert mean == pytest.approx(expected.mean(), rel=1e-6)
    assert std == pytest.approx(expected.std(), rel=1e-5)
    # Splits in file order would each hold 4 of the 40 classes: IS capped at C / 10.
    assert confident_split_scores(labels, np.arange(len(labels)), 10).mean() == pytest.approx(num_classes / 10)
    assert mean > 0.8 * num_classes  # ~35: a split of 100 draws sees most of the 40 classes


def test_inception_score_matches_torch_fidelity_on_class_ordered_and_unordered_logits():
    isc = pytest.importorskip("torch_fidelity.metric_isc")
    rng = np.random.default_rng(7)
    num_classes, per_class = 50, 30
    # Fairly confident, noisy, class-dependent logits in the pipeline's class-major order, and a shuffled copy.
    class_ordered = 6.0 * np.eye(num_classes)[np.arange(num_classes * per_class) // per_class] + \
        rng.normal(size=(num_classes * per_class, num_classes))
    unordered = class_ordered[rng.permutation(len(class_ordered))]
    for logits in (class_ordered, unordered):
        for seed in (0, 11):
            reference = isc.isc_features_to_metric(torch.from_numpy(logits), splits=10, shuffle=True, rng_seed=seed)
            mean, std = inception_score(logits, num_splits=10, seed=seed)
            assert mean == pytest.approx(reference["inception_score_mean"], rel=1e-9)
            assert std == pytest.approx(reference["inception_score_std"], rel=1e-6)
    # torch-fidelity without its shuffle, on the class-ordered set: the capped value the splits avoid.
    contiguous = isc.isc_features_to_metric(torch.from_numpy(class_ordered), splits=10, shuffle=False)
    assert contiguous["inception_score_mean"] < 0.5 * inception_score(class_ordered, 10, seed=0)[0]  # ~3.9 vs ~15


def test_inception_score_uses_fewer_splits_than_samples():
    mean, _ = inception_score(np.random.default_rng(6).normal(size=(3, 5)), num_splits=10, seed=0)
    assert mean == pytest.approx(1.0)  # one sample per split: p(y|x) = p(y)


# ---------------------------------------------------------------- precision / recall


def brute_force_precision_recall(gen: np.ndarray, ref: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]
    cross = np.linalg.norm(gen[:, None] - ref[None], axis=-1)
    precision = (cross <= radii(ref)[None, :]).any(axis=1).mean()
    recall = (cross <= radii(gen)[:, None]).any(axis=0).mean()
    return precision, recall


def test_precision_recall_of_identical_sets_is_one_and_of_far_apart_sets_zero():
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(80, 8))
    assert precision_recall(ref, ref, k=3) == (1.0, 1.0)
    assert precision_recall(ref + 100, ref, k=3) == (0.0, 0.0)


def test_precision_counts_generated_samples_on_the_reference_manifold():
    rng = np.random.default_rng(8)
    ref = rng.normal(size=(40, 8))
    gen = np.concatenate([ref[:20], rng.normal(size=(20, 8)) + 100])
    precision, _ = precision_recall(gen, ref, k=3)
    assert precision == 0.5


def test_a_sample_exactly_on_a_balls_boundary_is_inside_it():
    line = np.arange(5, dtype=np.float64)[:, None]  # every point's nearest neighbour is 1 away
    # 5 is 1 from 4, whose radius is 1: on the reference manifold (6 is not); 4 lies on the ball of 5 (radius 1).
    assert precision_recall(np.array([[5.0], [6.0]]), line, k=1) == pytest.approx((0.5, 0.2))
    assert precision_recall(line + 1, line, k=1) == (1.0, 1.0)


def test_precision_recall_matches_brute_force_across_batches():
    rng = np.random.default_rng(9)
    gen, ref = rng.normal(size=(37, 6)) + 0.3, rng.normal(size=(29, 6))
    expected = brute_force_precision_recall(gen, ref, k=3)
    assert precision_recall(gen, ref, k=3, batch_size=8) == pytest.approx(expected, abs=1e-6)


def test_precision_recall_k_sets_the_neighbourhood():
    rng = np.random.default_rng(6)
    gen, ref = rng.normal(size=(30, 5)) + 0.8, rng.normal(size=(25, 5))
    results = {k: precision_recall(gen, ref, k=k) for k in (1, 3, 6)}
    for k, result in results.items():
        assert result == pytest.approx(brute_force_precision_recall(gen, ref, k), abs=1e-6), k
    assert len(set(results.values())) == 3
    with pytest.raises(ValueError, match="k=25"):
        precision_recall(gen, ref, k=25)


# ---------------------------------------------------------------- features, statistics, compute_metrics


def test_extract_features_takes_in_memory_batches_like_files(tmp_path):
    network = build_feature_network("stand-in")
    paths = write_images(tmp_path, [(48, 48)] * 5)
    arrays = np.stack([np.asarray(Image.open(p)) for p in paths])
    from_files = extract_features(network, paths, batch_size=2)
    from_arrays = extract_features(network, (batch for batch in [arrays[:3], arrays[3:]]))  # lazily consumed
    for key in ("pool", "spatial", "logits"):
        np.testing.assert_allclose(from_files[key], from_arrays[key], rtol=1e-5, atol=1e-5)


def test_center_crop_crops_non_square_files_to_their_middle(tmp_path):
    network = build_feature_network("stand-in")
    wide = np.random.default_rng(13).integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    cropped = extract_features(network, [tmp_path / "wide.png"], center_crop=True)
    np.testing.assert_allclose(cropped["pool"], network.features(wide[None, :, 10:50])["pool"], rtol=1e-6)
    tall = np.random.default_rng(15).integers(0, 256, size=(60, 40, 3), dtype=np.uint8)
    Image.fromarray(tall).save(tmp_path / "tall.png")
    from_file = extract_features(network, [tmp_path / "tall.png"], center_crop=True)["pool"]
    np.testing.assert_allclose(from_file, network.features(tall[None, 10:50])["pool"], rtol=1e-6)
    # in-memory batches are cropped the same way, and nothing is cropped without center_crop
    np.testing.assert_allclose(extract_features(network, [tall[None]], center_crop=True)["pool"], from_file,
                               rtol=1e-6)
    np.testing.assert_allclose(extract_features(network, [tmp_path / "tall.png"])["pool"],
                               network.features(tall[None])["pool"], rtol=1e-6)
    assert not np.allclose(network.features(tall[None])["pool"], from_file, rtol=1e-3)


@pytest.fixture(scope="module")
def stand_in_sets(tmp_path_factory) -> tuple[dict, dict]:
    """Two sets of 24 smooth random images: the reference, and a darker 'generated' set."""
    rng = np.random.default_rng(14)
    base = rng.integers(0, 256, size=(24, 8, 8, 3)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in base])
    network = StandInFeatures()
    ref = extract_features(network, [images])
    gen = extract_features(network, [(images * 0.5).astype(np.uint8)])
    return gen, ref


def test_statistics_round_trip_through_npz(stand_in_sets, tmp_path):
    _, ref = stand_in_sets
    path = tmp_path / "stats" / "of" / "reference.npz"
    save_statistics(path, ref, skipped=["a/broken.JPEG", "b/empty.JPEG"], provenance={"device": "cpu", "threads": 2})
    stats = load_statistics(path)
    assert list(stats["skipped"]) == ["a/broken.JPEG", "b/empty.JPEG"]
    assert stats["provenance"] == {"device": "cpu", "threads": 2}
    assert type(stats["feature_network"]) is str and type(stats["num_images"]) is int
    without = load_statistics(save_statistics(tmp_path / "bare.npz", ref) or tmp_path / "bare.npz")
    assert without["provenance"] == {} and len(without["skipped"]) == 0
    # statistics written before provenance was recorded still load
    with np.load(tmp_path / "bare.npz") as data:
        np.savez(tmp_path / "old.npz", **{key: data[key] for key in data.files if key != "provenance"})
    assert load_statistics(tmp_path / "old.npz")["provenance"] == {}
    mu, sigma = feature_statistics(ref["spatial"])
    np.testing.assert_array_equal(stats["spatial_mu"], mu)
    np.testing.assert_array_equal(stats["spatial_sigma"], sigma)
    np.testing.assert_array_equal(stats["pool_features"], ref["pool"])
    assert stats["pool_sigma"].shape == (128, 128)
    assert stats["feature_network"] == ref["feature_network"]
    assert stats["num_images"] == 24


def test_statistics_files_holding_pickled_objects_are_refused(tmp_path):
    np.savez(tmp_path / "evil.npz", feature_network=np.array([{"not": "a string"}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_statistics(tmp_path / "evil.npz")


def test_compute_metrics_defaults_are_the_published_protocols(stand_in_sets):
    """KID over 100 subsets of at most 1000 (clean-fid), k = 3 for precision / recall (Kynkaanniemi et al.),
    10 IS splits, seed 0; the KID subset is capped by the smaller set."""
    gen, ref = stand_in_sets
    fewer = {**{key: gen[key][:20] for key in ("pool", "spatial", "logits")}, "feature_network": gen["feature_network"]}
    result = compute_metrics(fewer, ref)
    assert (result["kid_mean"], result["kid_std"]) == kernel_inception_distance(fewer["pool"], ref["pool"], 100,
                                                                                1000, seed=0)
    assert (result["precision"], result["recall"]) == precision_recall(fewer["pool"], ref["pool"], k=3)
    assert result["inception_score_mean"] == inception_score(fewer["logits"], 10, seed=0)[0]
    assert result["precision_recall_k"] == 3 and result["kid_subset_size"] == 20
    assert compute_metrics(gen, {**{key: ref[key][:18] for key in ("pool", "spatial", "logits")},
                                 "feature_network": ref["feature_network"]})["kid_subset_size"] == 18
    rng = np.random.default_rng(3)  # sets larger than a KID subset: subsets of 1000
    large = [{"pool": rng.normal(size=(1001, 4)) + shift, "spatial": rng.normal(size=(1001, 3)),
              "logits": rng.normal(size=(1001, 5)), "feature_network": "n"} for shift in (0.0, 0.1)]
    result = compute_metrics(*large)
    assert result["kid_subset_size"] == 1000
    reference_pool = large[1]["pool"].astype(np.float32)  # what reference statistics keep
    assert result["kid_mean"] == kernel_inception_distance(large[0]["pool"], reference_pool, 100, 1000, seed=0)[0]


def test_compute_metrics_against_itself_and_against_a_shifted_set(stand_in_sets, tmp_path):
    gen, ref = stand_in_sets
    itself = compute_metrics(ref, ref, kid_subsets=3)
    assert itself["fid"] == pytest.approx(0, abs=1e-4) and itself["sfid"] == pytest.approx(0, abs=1e-4)
    assert itself["precision"] == 1.0 and itself["recall"] == 1.0

    save_statistics(tmp_path / "reference.npz", ref)
    shifted = compute_metrics(gen, load_statistics(tmp_path / "reference.npz"), kid_subsets=3)
    assert shifted == compute_metrics(gen, ref, kid_subsets=3)  # statistics or raw features: one result
    assert shifted["fid"] > 0.5 and shifted["sfid"] > 0.5 and shifted["kid_mean"] > itself["kid_mean"]
    assert shifted["inception_score_mean"] > 1 and shifted["precision"] < 1
    assert shifted["num_generated"] == shifted["num_reference"] == 24
    assert shifted["inception_score_splits"] == 10 and shifted["kid_subset_size"] == 24
    assert "NOT Inception" in shifted["feature_network"]
    # compute_metrics' seed picks the IS permutation (24 samples in 10 splits: it changes the score).
    reseeded = compute_metrics(gen, ref, kid_subsets=3, seed=5)["inception_score_mean"]
    assert reseeded == inception_score(gen["logits"], 10, seed=5)[0] != shifted["inception_score_mean"]


def test_compute_metrics_refuses_to_mix_feature_networks(stand_in_sets):
    gen, ref = stand_in_sets
    with pytest.raises(ValueError, match="cannot be compared"):
        compute_metrics(gen, {**ref, "feature_network": INCEPTION_NAME})


def test_compute_metrics_hands_each_parameter_to_its_metric():
    rng = np.random.default_rng(7)
    network = "stand-in for this test"

    def features(shift):
        # float32 pool features: what a reference keeps of them (KID compares them as kept)
        return {"pool": (rng.normal(size=(20, 6)) + shift).astype(np.float32), "spatial": rng.normal(size=(20, 5)) + shift,
                "logits": 3 * rng.normal(size=(20, 4)), "feature_network": network}

    gen, ref = features(0.4), features(0.0)
    result = compute_metrics(gen, ref, kid_subsets=4, kid_subset_size=7, is_splits=3, pr_k=2, seed=9)
    assert (result["kid_mean"], result["kid_std"]) == kernel_inception_distance(gen["pool"], ref["pool"], 4, 7, 9)
    assert (result["inception_score_mean"], result["inception_score_std"]) == inception_score(gen["logits"], 3, 9)
    assert (result["precision"], result["recall"]) == precision_recall(gen["pool"], ref["pool"], 2)
    assert result["kid_subset_size"] == 7 and result["inception_score_splits"] == 3
    assert result["precision_recall_k"] == 2
    default = compute_metrics(gen, ref)
    for key in ("kid_mean", "inception_score_mean", "precision"):
        assert default[key] != result[key], key
