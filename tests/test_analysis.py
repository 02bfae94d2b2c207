"""The alignment analyses (urepa.analysis): CKNNA, held-out CCA, their chance levels and t-SNE on constructed
features with known answers and against references written out here (loops over the definitions); the held-out
batch; and the analysis of a trained run."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from PIL import Image

from conftest import CPU, DINO_SIZE, SEED, SMOKE_IMAGE_SIZE, write_png
from urepa.analysis import (
    alignment_analysis,
    alignment_scores,
    analysis_layer,
    cca_score,
    chance_level,
    cknna,
    held_out_rows,
    shuffled_pairings,
    tsne_plot,
)
from urepa.subset import build_subset


@pytest.fixture
def features():
    rng = np.random.default_rng(0)
    # clustered features, so neighbourhoods are meaningful
    centres = rng.standard_normal((6, 48))
    return np.repeat(centres, 10, axis=0) + 0.3 * rng.standard_normal((60, 48))


def test_cknna_is_one_for_identical_or_rotated_features(features):
    assert cknna(features, features) == pytest.approx(1.0, abs=1e-6)
    rotation, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((48, 48)))
    assert cknna(features, features @ rotation) == pytest.approx(1.0, abs=1e-6)


def test_cknna_is_near_zero_for_unrelated_features(features):
    unrelated = np.random.default_rng(2).standard_normal(features.shape)
    assert abs(cknna(features, unrelated)) < 0.2
    noisy = features + 0.5 * np.random.default_rng(3).standard_normal(features.shape)
    # the unbiased estimator may pass 1 slightly for near-identical geometry
    assert abs(cknna(features, unrelated)) < 0.5 < cknna(features, noisy) < 1.05


def test_cknna_pools_tokens_and_accepts_tensors(features):
    tokens = torch.from_numpy(np.repeat(features[:, None], 4, axis=1))
    assert cknna(tokens, features) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="at least 5"):
        cknna(features[:4], features[:4])


# -- CKNNA against its definition ---------------------------------------------------------------------


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


# -- CCA, pairings, alignment scores ------------------------------------------------------------------


def test_cca_clamps_components_with_few_images(features):
    result = cca_score(features[:24], features[:24] @ np.eye(48))
    assert result["cca_fit_images"] == result["cca_scored_images"] == 12
    assert result["cca_pca_dims"] == 3 and result["cca_components"] == 3  # 12 fitting images -> at most 3 dims
    with pytest.raises(ValueError, match="at least 8"):
        cca_score(features[:7], features[:7])


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


# -- at the real analysis shape: 256 held-out images, mid-block features (1280-d) vs DINOv2-L (1024-d) --


N_IMAGES, UNET_DIM, DINO_DIM, LATENT_DIM = 256, 1280, 1024, 48


@pytest.fixture(scope="module")
def held_out_labels(tmp_path_factory) -> np.ndarray:
    """Class ids of the analysis batch in the order `held_out_rows` gives it (rank-major: one image of
    every class in turn), from a validation table of 64 classes x 10 images."""
    table = pd.DataFrame({"id": range(640), "img_path": [f"{i}.JPEG" for i in range(640)],
                          "class_id": np.repeat(np.arange(64), 10), "synset": "s"})
    csv = tmp_path_factory.mktemp("val") / "val.csv"
    table.to_csv(csv, index=False)
    with pytest.MonkeyPatch.context() as patch:  # only the order matters here: every listed file counts as usable
        patch.setattr("urepa.analysis.open_rgb", lambda path: None)
        return held_out_rows(csv, N_IMAGES)["class_id"].to_numpy()


def embedded(latent: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """The latent rows in `dim` dimensions through orthonormal axes: the same geometry, other coordinates."""
    axes, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, latent.shape[1])))
    return latent @ axes.T


@pytest.fixture(scope="module")
def unet_like(held_out_labels) -> dict:
    """Class-clustered 48-d structure seen by 'U-Net features' (1280-d, plus isotropic noise)."""
    rng = np.random.default_rng(10)
    latent = rng.standard_normal((64, LATENT_DIM))[held_out_labels] + 0.7 * rng.standard_normal((N_IMAGES, LATENT_DIM))
    return {"latent": latent,
            "features": embedded(latent, UNET_DIM, 11) + 0.05 * rng.standard_normal((N_IMAGES, UNET_DIM))}


def reference_held_out_cca(x, y, fit, scored, dims, components) -> float:
    """Hand-written reference: PCA by numpy's SVD of the fit half, centred on its mean; CCA by whitening
    each side's covariance (eigendecomposition) and an SVD of the whitened cross-covariance; mean
    correlation of the canonical pairs on the scored rows."""
    def pca(a):
        mean = a[fit].mean(axis=0)
        _, _, vt = np.linalg.svd(a[fit] - mean, full_matrices=False)
        return (a - mean) @ vt[:dims].T

    def inverse_sqrt(c):
        values, vectors = np.linalg.eigh(c)
        return vectors @ np.diag(values ** -0.5) @ vectors.T

    px, py = pca(x), pca(y)
    xf, yf = px[fit] - px[fit].mean(axis=0), py[fit] - py[fit].mean(axis=0)
    wx, wy = inverse_sqrt(xf.T @ xf), inverse_sqrt(yf.T @ yf)
    u, _, vt = np.linalg.svd(wx @ (xf.T @ yf) @ wy)
    xs, ys = px[scored] @ (wx @ u[:, :components]), py[scored] @ (wy @ vt[:components].T)
    return float(np.mean([np.corrcoef(xs[:, i], ys[:, i])[0, 1] for i in range(components)]))


def test_held_out_cca_of_unrelated_features_is_chance_where_the_in_sample_fit_was_half(unet_like):
    unrelated = embedded(np.random.default_rng(20).standard_normal((N_IMAGES, LATENT_DIM)), DINO_DIM, 21)
    scores = alignment_scores(unet_like["features"], unrelated, shuffled_pairings(N_IMAGES, seed=0))
    assert scores["cca_fit_images"] == scores["cca_scored_images"] == 128
    assert scores["cca_pca_dims"] == 32 and scores["cca_components"] == 10
    assert abs(scores["cca"]) < 0.1 and abs(scores["cca_chance"]) < 0.05
    assert abs(scores["cca"] - scores["cca_chance"]) < 0.1
    assert abs(scores["cknna"]) < 0.1 and abs(scores["cknna_chance"]) < 0.05
    # The former score: 32 PCA dims, fitted and scored on all 256 images.
    everything = np.arange(N_IMAGES)
    in_sample = reference_held_out_cca(unet_like["features"], unrelated, everything, everything, 32, 10)
    assert in_sample > 0.4 and scores["cca"] < in_sample - 0.35


def test_held_out_cca_of_a_noisy_linear_map_is_near_one_far_above_chance(unet_like):
    rng = np.random.default_rng(30)
    mapped = unet_like["features"] @ rng.standard_normal((UNET_DIM, DINO_DIM)) / np.sqrt(UNET_DIM)
    target = mapped + 0.1 * mapped.std() * rng.standard_normal(mapped.shape)
    scores = alignment_scores(unet_like["features"], target, shuffled_pairings(N_IMAGES, seed=0))
    assert scores["cca"] > 0.95
    assert scores["cca_chance"] < 0.1


def test_held_out_cca_equals_a_numpy_reference_and_sklearns_cca(unet_like):
    from sklearn.cross_decomposition import CCA

    # Partly related: DINOv2-like features see 16 of the 48 latent directions, through noise.
    rng = np.random.default_rng(40)
    target = embedded(unet_like["latent"][:, :16] + rng.standard_normal((N_IMAGES, 16)), DINO_DIM, 41)
    target += 0.05 * rng.standard_normal(target.shape)
    result = cca_score(unet_like["features"], target, seed=3)
    assert 0.2 < result["cca"] < 0.9
    # The documented split: the first half of a permutation seeded by `seed` fits, the rest is scored.
    order = np.random.default_rng(3).permutation(N_IMAGES)
    fit, scored = order[:128], order[128:]
    assert result["cca"] == pytest.approx(reference_held_out_cca(unet_like["features"], target, fit, scored, 32, 10),
                                          abs=1e-6)
    # sklearn's iterative CCA on the same PCA projections agrees to its convergence tolerance.
    def reduced(a):
        mean = a[fit].mean(axis=0)
        _, _, vt = np.linalg.svd(a[fit] - mean, full_matrices=False)
        return (a[fit] - mean) @ vt[:32].T, (a[scored] - mean) @ vt[:32].T
    (xf, xs), (yf, ys) = reduced(unet_like["features"]), reduced(target)
    xc, yc = CCA(n_components=10, max_iter=5000, tol=1e-10).fit(xf, yf).transform(xs, ys)
    sklearn_cca = np.mean([np.corrcoef(xc[:, i], yc[:, i])[0, 1] for i in range(10)])
    assert result["cca"] == pytest.approx(sklearn_cca, abs=1e-4)


def test_cknna_chance_is_zero_on_a_matched_pair_and_far_below_cknna_of_identical_geometry(unet_like):
    same_geometry = embedded(unet_like["latent"], DINO_DIM, 50)
    pairings = shuffled_pairings(N_IMAGES, seed=0)
    assert cknna(embedded(unet_like["latent"], UNET_DIM, 11), same_geometry) == pytest.approx(1.0, abs=1e-6)
    chance = chance_level(cknna, unet_like["features"], same_geometry, pairings)
    assert abs(chance) < 0.05
    scores = alignment_scores(unet_like["features"], same_geometry, pairings)
    assert scores["cknna_chance"] == chance
    assert scores["cknna"] > 0.9 > 0.8 + scores["cknna_chance"]
    assert scores["cca"] > 0.95 > 0.85 + scores["cca_chance"]


def test_chance_level_averages_the_score_over_the_seeded_pairings(features):
    pairings = shuffled_pairings(len(features), seed=5, count=4)
    assert len(pairings) == 4 and all(sorted(p) == list(range(len(features))) for p in pairings)
    assert all(np.array_equal(a, b) for a, b in zip(pairings, shuffled_pairings(len(features), seed=5, count=4)))
    tokens = torch.from_numpy(np.repeat(features[:, None], 3, axis=1))  # [B, N, D] tokens, pooled first
    expected = np.mean([cknna(features, features[p]) for p in pairings])
    assert chance_level(cknna, features, tokens, pairings) == pytest.approx(expected, abs=1e-12)


# -- t-SNE ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target_dim, with_head", [(48, True), (48, False), (32, False)])
def test_tsne_writes_a_png_and_returns_all_points(features, tmp_path, target_dim, with_head):
    target = features[:, :target_dim]
    head = features[:, :target_dim] if with_head else None
    coords = tsne_plot(features, target, labels=np.arange(60) // 10, path=tmp_path / "t.png", head_tokens=head,
                       title="x")
    assert coords.shape == (240 if with_head else 120, 2)
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_joint_tsne_map_needs_one_space(features, tmp_path):
    with pytest.raises(ValueError, match="one space"):
        tsne_plot(features, features[:, :32], np.arange(60) // 10, tmp_path / "t.png", head_tokens=features)


def test_tsne_maps_are_sklearns_of_the_pooled_normalised_features(tmp_path):
    """The U-Net map and the DINOv2 map: one t-SNE each; the joint map: one t-SNE of head rows then DINOv2 rows.
    Perplexity min(30, (points - 1) / 3), PCA initialisation. (`seed` goes to sklearn as random_state, which the
    PCA initialisation never draws from: the maps do not depend on it.)"""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(9)
    tokens = rng.standard_normal((50, 3, 8)) + np.repeat(rng.standard_normal((5, 1, 8)) * 3, 10, axis=0)
    target = 5 * (tokens.mean(axis=1) + 0.3 * rng.standard_normal((50, 8)))  # scaled: only directions count
    raw = rng.standard_normal((50, 12))
    labels = np.repeat(np.arange(5), 10)

    def by_hand(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), random_state=0, init="pca").fit_transform(x)

    pooled = tokens.mean(axis=1)
    coords = tsne_plot(raw, target, labels, tmp_path / "joint.png", head_tokens=tokens)
    expected = np.concatenate([by_hand(raw), by_hand(target), by_hand(np.concatenate([pooled, target]))])
    np.testing.assert_allclose(coords, expected, rtol=1e-5, atol=1e-5)
    coords = tsne_plot(raw, target, labels, tmp_path / "separate.png")
    np.testing.assert_allclose(coords, expected[:100], rtol=1e-5, atol=1e-5)


def test_tsne_figure_has_the_same_panels_for_every_run_and_names_the_classes(tmp_path, monkeypatch):
    """Three panels, left to right, whether or not the run has a head (the baseline's third says it has none);
    circles for the U-Net, crosses for DINOv2, colour = class, named in a legend; the title on top."""
    import matplotlib.axes
    import matplotlib.figure

    scatters, titles, legends = [], [], []
    scatter, suptitle, legend = (matplotlib.axes.Axes.scatter, matplotlib.figure.Figure.suptitle,
                                 matplotlib.figure.Figure.legend)

    def recording_scatter(ax, x, y, **kwargs):
        scatters.append((ax, {**kwargs, "xy": np.stack([x, y], 1)}))
        return scatter(ax, x, y, **kwargs)

    def recording_suptitle(fig, text, **kwargs):
        titles.append(text)
        return suptitle(fig, text, **kwargs)

    def recording_legend(fig, *args, **kwargs):
        legends.append([(h.get_label(), h.get_marker(), h.get_color()) for h in kwargs["handles"]])
        return legend(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", recording_scatter)
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", recording_suptitle)
    monkeypatch.setattr(matplotlib.figure.Figure, "legend", recording_legend)
    features = clusters([0, 90, 180], per=4)
    labels = np.repeat(np.array([7, 2, 5]), 4)
    names = {2: "goldfish", 5: "hen", 7: "tench"}
    for head in (features[:, ::-1], None):
        scatters.clear()
        path = tmp_path / f"{head is None}.png"
        coords = tsne_plot(features, features[:, ::-1], labels, path, head_tokens=head, class_names=names,
                           title="map")
        assert np.array_equal(np.concatenate([kwargs["xy"] for _, kwargs in scatters]), coords)
        axes = scatters[0][0].figure.axes
        assert [ax.get_title() for ax in axes] == ["U-Net features (pooled)", "DINOv2 tokens (pooled)",
                                                   "align head + DINOv2, one map"]
        left, middle, right = (ax.get_position() for ax in axes)
        assert left.x1 < middle.x0 < middle.x1 < right.x0
        drawn_on = [axes.index(ax) for ax, _ in scatters]
        assert drawn_on == ([0, 1, 2, 2] if head is not None else [0, 1])
        assert [kwargs["marker"] for _, kwargs in scatters] == ["o", "x", "o", "x"][:len(drawn_on)]
        assert [t.get_text() for t in axes[2].texts] == ([] if head is not None else
                                                         ["no align head (λ = 0):\nno head tokens to map"])
        # one colour per class, the same in every panel, and the legend names it
        by_class = {name: colour for name, marker, colour in legends[-1] if marker == "o" and name in names.values()}
        assert list(by_class) == ["goldfish", "hen", "tench"]  # sorted by class id
        for _, kwargs in scatters:
            assert [tuple(c) for c in kwargs["c"]] == [tuple(by_class[names[c]]) for c in labels]
        assert len(set(map(tuple, by_class.values()))) == 3
        assert [(name, marker) for name, marker, _ in legends[-1][3:]] == [("U-Net", "o"), ("DINOv2", "x")]
        assert titles[-1] == "map"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tsne_plot(features, features, labels, tmp_path / "unnamed.png")
    assert [name for name, _, _ in legends[-1][:3]] == ["2", "5", "7"]  # no names: the class ids
    assert titles[-1] == ""


# -- the held-out batch and the analysis of a run ------------------------------------------------------


def test_held_out_batch_is_class_balanced_fixed_and_passes_over_unusable_images(tmp_path, caplog):
    paths = [write_png(tmp_path / f"{i}.png", (i, i, i)) for i in range(12)]
    (tmp_path / "1.png").write_bytes(b"not a png")               # class 0's second image: damaged
    Image.new("RGB", (1, 1)).save(tmp_path / "6.png")          # class 1's first image: 1x1
    table = pd.DataFrame({"id": range(12), "img_path": paths, "class_id": [0] * 6 + [1] * 3 + [2] * 3, "synset": "s"})
    table.to_csv(tmp_path / "val.csv", index=False)
    skipped = []
    rows = held_out_rows(tmp_path / "val.csv", 6, skipped)
    assert rows["class_id"].value_counts().tolist() == [2, 2, 2]
    assert rows["id"].tolist() == [0, 9, 7, 10, 2, 8]  # rank-major; a later image of the class steps in
    assert sorted(skipped) == sorted([paths[1], paths[6]]) and paths[1] in caplog.text
    assert rows.equals(held_out_rows(tmp_path / "val.csv", 6))


def test_every_ablation_is_analysed_at_the_mid_block_when_aligned_there():
    # Every ablation is analysed at the mid block when it is aligned there, whatever else is.
    assert analysis_layer(["enc_last", "mid", "dec_first"]) == "mid" and analysis_layer(["dec_first"]) == "dec_first"


@pytest.mark.slow  # trains the smoke tier's 120-step run (conftest's smoke_run): minutes
def test_alignment_analysis_of_the_run_does_not_depend_on_the_batch_size(smoke_run, data, smoke_inputs, tmp_path):
    val_csv = tmp_path / "val_subset.csv"
    build_subset(smoke_inputs["imagenet"], images_per_class=4, seed=0, split="val").to_csv(val_csv, index=False)
    clip = zarr.open_group(str(data["caches"]["clip"]), mode="r")["embeddings"][:]

    def analyse(batch_size: int) -> dict:
        return alignment_analysis(val_csv, data["sd15"], data["dinov2"], smoke_run["model_dir"] / "ema", clip,
                                  SMOKE_IMAGE_SIZE, DINO_SIZE, 12, [100, 500, 900], SEED, CPU,
                                  tmp_path / f"tsne-{batch_size}.png", batch_size=batch_size)

    whole, batched = analyse(32), analyse(5)
    assert whole["layer"] == "mid" and whole["has_head"] and whole["images"] == 12
    assert [e["timestep"] for e in whole["timesteps"]] == [100, 500, 900]
    for a, b in zip(whole["timesteps"], batched["timesteps"]):
        scores = {"cknna", "cca", "head_token_cosine", "head_cknna"}
        assert a.keys() == b.keys() >= scores | {f"{score}_chance" for score in scores}
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    assert (tmp_path / "tsne-32.png").stat().st_size > 0


def test_an_irepa_head_is_scored_against_the_spatially_normalised_tokens_it_was_trained_towards(data, smoke_inputs,
                                                                                              tmp_path):
    """The same irepa weights analysed twice: as exported (alpha 0.6 in align_heads.json) and with alpha removed.
    Only the head's token cosine and its chance level move; the head-free scores and the head's CKNNA (on pooled
    tokens) are the same numbers."""
    import json
    import shutil

    from conftest import batch_of, make_trainer, settings_for

    trainer = make_trainer(data, settings_for("irepa", steps=8), tmp_path / "run")
    trainer.step(batch_of(trainer, data))
    trainer.save_weights(tmp_path / "irepa")
    shutil.copytree(tmp_path / "irepa", tmp_path / "raw")
    heads = json.loads((tmp_path / "raw" / "align_heads.json").read_text())
    assert heads.pop("target_spatial_norm") == 0.6
    (tmp_path / "raw" / "align_heads.json").write_text(json.dumps(heads))
    val_csv = tmp_path / "val_subset.csv"
    build_subset(smoke_inputs["imagenet"], images_per_class=4, seed=0, split="val").to_csv(val_csv, index=False)

    def analyse(name: str) -> dict:
        result = alignment_analysis(val_csv, data["sd15"], data["dinov2"], tmp_path / name, data["clip"],
                                    SMOKE_IMAGE_SIZE, DINO_SIZE, 8, [500], SEED, CPU, tmp_path / f"{name}.png")
        return result["timesteps"][0]

    normalised, raw = analyse("irepa"), analyse("raw")
    for key in ("cknna", "cknna_chance", "cca", "cca_chance", "head_cknna", "head_cknna_chance"):
        assert normalised[key] == pytest.approx(raw[key], rel=1e-6, abs=1e-9), key
    assert abs(normalised["head_token_cosine"] - raw["head_token_cosine"]) > 1e-3
    assert -1 <= normalised["head_token_cosine"] <= 1
