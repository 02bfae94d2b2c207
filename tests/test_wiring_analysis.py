"""Every documented parameter of the alignment analyses and the sample metrics changes the result the way
its documentation says, checked against references written out here (loops over the definitions)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_alignment_analysis import reference_held_out_cca
from urepa.analysis import alignment_scores, cca_score, cknna, shuffled_pairings, tsne_plot
from urepa.metrics import (
    StandInFeatures,
    compute_metrics,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)


# -- CKNNA ------------------------------------------------------------------------------------------------
def reference_cknna(a: np.ndarray, b: np.ndarray, topk: int) -> float:
    """Huh et al. (2024) written out: cosine kernels of the per-image features; pair (i, j) kept where j is
    among i's top-k neighbours (i itself excluded) in both kernels; Song et al.'s unbiased HSIC as sums."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def neighbours(kernel):
        m = len(kernel)
        mask = np.zeros((m, m))
        for i in range(m):
            others = sorted((j for j in range(m) if j != i), key=lambda j: -kernel[i, j])
            mask[i, others[:topk]] = 1
        return mask

    def hsic(k, l):
        m = len(k)
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        trace = sum(k[i, j] * l[j, i] for i in range(m) for j in range(m))
        row_products = sum(k[i, j] * l[j, q] for i in range(m) for j in range(m) for q in range(m))
        total = trace + k.sum() * l.sum() / ((m - 1) * (m - 2)) - 2 * row_products / (m - 2)
        return total / (m * (m - 3))

    k, l = unit(a) @ unit(a).T, unit(b) @ unit(b).T
    mask_k, mask_l = neighbours(k), neighbours(l)
    both = mask_k * mask_l
    return hsic(both * k, both * l) / np.sqrt(hsic(mask_k * k, mask_k * k) * hsic(mask_l * l, mask_l * l))


def clusters(angles, per: int = 6, dim: int = 10) -> np.ndarray:
    """Clusters whose centres lie at `angles` (degrees) on a circle, with small offsets orthogonal to the
    circle's plane. Cluster k's offsets are the same whatever its angle (a jitter per cluster keeps
    distances between clusters from tying)."""
    rng = np.random.default_rng(1)
    offsets = 0.2 * rng.standard_normal((per, dim - 2))
    jitter = 0.02 * rng.standard_normal((len(angles), per, dim - 2))
    centres = 3 * np.stack([np.cos(np.radians(angles)), np.sin(np.radians(angles))], 1)
    return np.concatenate([np.repeat(centres, per, 0), (offsets + jitter).reshape(-1, dim - 2)], 1)


def test_cknna_equals_the_reference_formula_on_a_fixed_input():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 6))
    b = a @ rng.standard_normal((6, 5)) + 0.8 * rng.standard_normal((12, 5))
    for topk in (2, 4, 7):
        assert cknna(a, b, topk=topk) == pytest.approx(reference_cknna(a, b, topk), abs=1e-9), topk
    # tokens [B, N, D] are mean-pooled per image first
    tokens = np.stack([a, a + rng.standard_normal(a.shape)], axis=1)
    assert cknna(tokens, b, topk=4) == pytest.approx(reference_cknna(tokens.mean(axis=1), b, 4), abs=1e-9)


def test_cknna_follows_topk_where_local_and_global_structure_disagree():
    """Same clusters, same within-cluster geometry, but two clusters swap places on the circle: neighbours
    inside a cluster agree, the wider neighbourhoods do not."""
    a, b = clusters([0, 40, 80, 120, 160]), clusters([0, 120, 80, 40, 160])
    local, wide = cknna(a, b, topk=5), cknna(a, b, topk=22)
    assert local == pytest.approx(1.0, abs=1e-6)
    assert wide < 0.8
    assert wide == pytest.approx(reference_cknna(a, b, 22), abs=1e-9)
    assert cknna(a, b) == pytest.approx(reference_cknna(a, b, 10), abs=1e-9)  # the default topk is 10
    # more neighbours than there are other images (less one): clamped to n - 2
    assert cknna(a, b, topk=100) == pytest.approx(reference_cknna(a, b, len(a) - 2), abs=1e-9)


def test_cknna_takes_tensors_in_the_graph_and_computes_in_float64():
    a = np.random.default_rng(5).standard_normal((10, 6))
    b = a + np.random.default_rng(6).standard_normal((10, 6))
    tensor = torch.from_numpy(a).float().requires_grad_()  # e.g. align-head tokens straight from a forward
    assert cknna(tensor, b, topk=3) == pytest.approx(reference_cknna(a.astype(np.float32).astype(np.float64), b, 3),
                                                      abs=1e-10)  # float32 arithmetic: ~1e-7 off


def test_cknna_takes_five_images_and_no_fewer():
    a = np.random.default_rng(2).standard_normal((5, 4))
    assert cknna(a, a, topk=2) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 5 images, got 4"):
        cknna(a[:4], a[:4])


# -- CCA, pairings, alignment scores, t-SNE ------------------------------------------------------------------
@pytest.fixture(scope="module")
def related():
    rng = np.random.default_rng(3)
    latent = rng.standard_normal((120, 6))
    x = latent @ rng.standard_normal((6, 20)) + 0.5 * rng.standard_normal((120, 20))
    y = latent @ rng.standard_normal((6, 16)) + 0.5 * rng.standard_normal((120, 16))
    return x, y


@pytest.mark.parametrize("n_components", [1, 3, 7])
def test_cca_n_components_is_the_number_of_canonical_pairs_averaged(related, n_components):
    x, y = related
    result = cca_score(x, y, n_components=n_components, seed=2)
    order = np.random.default_rng(2).permutation(len(x))
    dims = min(32, 60 // 4, 20, 16)
    assert result["cca_pca_dims"] == dims and result["cca_components"] == n_components
    assert result["cca"] == pytest.approx(
        reference_held_out_cca(x, y, order[:60], order[60:], dims, n_components), abs=1e-6)


def test_cca_sizes_at_their_bounds():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 5))
    smallest = cca_score(x, x[:, ::-1])  # 8 images: 4 fit, 4 scored, one PCA dimension
    assert (smallest["cca_fit_images"], smallest["cca_pca_dims"], smallest["cca_components"]) == (4, 1, 1)
    assert smallest["cca"] == pytest.approx(1.0, abs=1e-9)  # the same features, reordered
    with pytest.raises(ValueError, match="at least 8 images, got 7"):
        cca_score(x[:7], x[:7])
    narrow = cca_score(rng.standard_normal((120, 3)), rng.standard_normal((120, 20)))  # 60 fit: 15 allowed
    assert (narrow["cca_pca_dims"], narrow["cca_components"]) == (3, 3)
    assert cca_score(rng.standard_normal((120, 20)), rng.standard_normal((120, 2)))["cca_pca_dims"] == 2
    many = rng.standard_normal((272, 40))  # 136 fitting images would allow 34 dimensions: at most 32
    assert cca_score(many, many)["cca_pca_dims"] == 32


def test_cca_seed_picks_the_split_and_alignment_scores_passes_its_seed_on(related):
    x, y = related
    scores = {seed: cca_score(x, y, seed=seed)["cca"] for seed in (0, 1)}
    assert scores[0] != scores[1] and cca_score(x, y)["cca"] == scores[0]  # seed 0 by default
    pairings = shuffled_pairings(len(x), seed=0, count=2)
    assert alignment_scores(x, y, pairings)["cca"] == scores[0]  # seed 0 by default
    for seed in (0, 1):
        combined = alignment_scores(x, y, pairings, seed=seed)
        assert combined["cca"] == scores[seed]
        assert combined["cknna"] == cknna(x, y)
        expected_chance = np.mean([cca_score(x, y[p], seed=seed)["cca"] for p in pairings])
        assert combined["cca_chance"] == pytest.approx(expected_chance, abs=1e-12)


def test_shuffled_pairings_follow_their_seed_and_count():
    first, again = shuffled_pairings(20, seed=1, count=3), shuffled_pairings(20, seed=1, count=3)
    assert len(first) == 3 and all(np.array_equal(p, q) for p, q in zip(first, again))
    other = shuffled_pairings(20, seed=2, count=3)
    assert not any(np.array_equal(p, q) for p, q in zip(first, other))
    rng = np.random.default_rng(1)  # the documented draw: successive permutations of one seeded generator
    assert all(np.array_equal(p, rng.permutation(20)) for p in first)
    assert len(shuffled_pairings(20, seed=1)) == 10  # chance levels average 10 pairings by default


# -- sample metrics -----------------------------------------------------------------------------------------
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


def brute_force_precision_recall(gen: np.ndarray, ref: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        return np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, k]

    cross = np.linalg.norm(gen[:, None] - ref[None], axis=-1)
    return (cross <= radii(ref)[None, :]).any(axis=1).mean(), (cross <= radii(gen)[:, None]).any(axis=0).mean()


def test_precision_recall_k_sets_the_neighbourhood():
    rng = np.random.default_rng(6)
    gen, ref = rng.normal(size=(30, 5)) + 0.8, rng.normal(size=(25, 5))
    results = {k: precision_recall(gen, ref, k=k) for k in (1, 3, 6)}
    for k, result in results.items():
        assert result == pytest.approx(brute_force_precision_recall(gen, ref, k), abs=1e-6), k
    assert len(set(results.values())) == 3
    with pytest.raises(ValueError, match="k=25"):
        precision_recall(gen, ref, k=25)


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


def test_stand_in_network_sizes_follow_its_parameters():
    images = np.random.default_rng(8).integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)
    network = StandInFeatures(input_size=32, pool_dim=24, num_classes=5)
    out = network.features(images)
    assert network.input_size == 32
    assert out["pool"].shape == (2, 24) and out["logits"].shape == (2, 5)
    assert out["spatial"].shape == (2, 7 * 4 * 4)  # an 8x downsampling trunk: 32 px -> 4 x 4
    assert torch.equal(network.resize(images[0]), network.resize(images[0])) and network.resize(images[0]).shape == (3, 32, 32)


def test_tsne_maps_are_sklearns_of_the_pooled_normalised_features(tmp_path):
    """Joint map: one t-SNE of U-Net rows then DINOv2 rows; separate maps: one each. Perplexity
    min(30, (points - 1) / 3), PCA initialisation. (`seed` goes to sklearn as random_state, which the PCA
    initialisation never draws from: the maps do not depend on it.)"""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(9)
    tokens = rng.standard_normal((50, 3, 8)) + np.repeat(rng.standard_normal((5, 1, 8)) * 3, 10, axis=0)
    target = 5 * (tokens.mean(axis=1) + 0.3 * rng.standard_normal((50, 8)))  # scaled: only directions count
    labels = np.repeat(np.arange(5), 10)

    def by_hand(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), random_state=0, init="pca").fit_transform(x)

    pooled = tokens.mean(axis=1)
    joint = tsne_plot(tokens, target, labels, tmp_path / "joint.png", shared_space=True)
    np.testing.assert_allclose(joint, by_hand(np.concatenate([pooled, target])), rtol=1e-5, atol=1e-5)
    separate = tsne_plot(tokens, target, labels, tmp_path / "separate.png", shared_space=False)
    np.testing.assert_allclose(separate, np.concatenate([by_hand(pooled), by_hand(target)]), rtol=1e-5, atol=1e-5)


def test_tsne_figure_marks_the_source_and_colours_the_class(tmp_path, monkeypatch):
    """Circles for the U-Net, crosses for DINOv2, colour = class; one axes for a joint map, two otherwise;
    the title on top; the PNG where asked."""
    import matplotlib.axes
    import matplotlib.figure

    scatters, titles = [], []
    scatter, suptitle = matplotlib.axes.Axes.scatter, matplotlib.figure.Figure.suptitle

    def recording_scatter(ax, x, y, **kwargs):
        scatters.append((ax, {**kwargs, "xy": np.stack([x, y], 1)}))
        return scatter(ax, x, y, **kwargs)

    def recording_suptitle(fig, text, **kwargs):
        titles.append(text)
        return suptitle(fig, text, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", recording_scatter)
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", recording_suptitle)
    features = clusters([0, 90, 180], per=4)
    labels = np.repeat(np.arange(3), 4)
    for shared, names in ((True, ["U-Net (align head)", "DINOv2"]), (False, ["U-Net (raw features)", "DINOv2"])):
        scatters.clear()
        path = tmp_path / f"{shared}.png"
        coords = tsne_plot(features, features[:, ::-1], labels, path, shared_space=shared, title=f"map {shared}")
        assert np.array_equal(np.concatenate([kwargs["xy"] for _, kwargs in scatters]), coords)
        axes = scatters[0][0].figure.axes
        if shared:
            assert axes == [scatters[0][0]]
        else:  # two maps side by side, U-Net on the left
            assert axes == [scatters[0][0], scatters[1][0]]
            assert axes[0].get_position().x1 < axes[1].get_position().x0
            assert axes[0].get_position().y0 == axes[1].get_position().y0
        assert [kwargs["marker"] for _, kwargs in scatters] == ["o", "x"]
        assert [kwargs["label"] for _, kwargs in scatters] == names
        assert all(np.array_equal(kwargs["c"], labels) for _, kwargs in scatters)
        assert (scatters[0][0] is scatters[1][0]) == shared
        assert titles[-1] == f"map {shared}"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tsne_plot(features, features, labels, tmp_path / "untitled.png", shared_space=True)
    assert titles[-1] == ""
