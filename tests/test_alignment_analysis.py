"""CKNNA, CCA and t-SNE on constructed features with known answers."""
import numpy as np
import pytest
import torch

from urepa.analysis import cca_score, cknna, tsne_plot


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


def test_cca_finds_a_linear_relation_and_not_noise(features):
    mixing = np.random.default_rng(4).standard_normal((48, 32))
    related = cca_score(features, features @ mixing)
    unrelated = cca_score(features, np.random.default_rng(5).standard_normal((60, 32)))
    assert related["cca"] > 0.9
    assert unrelated["cca"] < related["cca"] - 0.3
    assert related["cca_pca_dims"] == 15 and related["cca_components"] == 10  # 60 images -> at most 15 dims


def test_cca_clamps_components_with_few_images(features):
    result = cca_score(features[:12], features[:12] @ np.eye(48))
    assert result["cca_pca_dims"] == 3 and result["cca_components"] == 3


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
