"""CKNNA, held-out CCA, their chance levels and t-SNE on constructed features with known answers."""
import numpy as np
import pandas as pd
import pytest
import torch

from urepa.analysis import alignment_scores, cca_score, chance_level, cknna, shuffled_pairings, tsne_plot
from urepa.evaluate import held_out_rows


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


def test_cca_clamps_components_with_few_images(features):
    result = cca_score(features[:24], features[:24] @ np.eye(48))
    assert result["cca_fit_images"] == result["cca_scored_images"] == 12
    assert result["cca_pca_dims"] == 3 and result["cca_components"] == 3  # 12 fitting images -> at most 3 dims
    with pytest.raises(ValueError, match="at least 8"):
        cca_score(features[:7], features[:7])


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
        patch.setattr("urepa.evaluate.open_rgb", lambda path: None)
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


@pytest.mark.parametrize("target_dim, shared_space", [(48, True), (48, False), (32, False)])
def test_tsne_writes_a_png_and_returns_all_points(features, tmp_path, target_dim, shared_space):
    target = features[:, :target_dim]
    coords = tsne_plot(features, target, labels=np.arange(60) // 10, path=tmp_path / "t.png",
                       shared_space=shared_space, title="x")
    assert coords.shape == (120, 2)
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_joint_tsne_map_needs_one_space(features, tmp_path):
    with pytest.raises(ValueError, match="one space"):
        tsne_plot(features, features[:, :32], np.arange(60) // 10, tmp_path / "t.png", shared_space=True)
