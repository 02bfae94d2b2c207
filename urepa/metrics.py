"""Sample-quality metrics: FID, sFID, KID, Inception Score, improved precision / recall, computed on the features
of a feature network (urepa.feature_networks), and the statistics files of reference sets.

pool features give FID, KID and precision / recall, spatial features sFID, logits the Inception Score.
Every feature and result dict carries the network's `feature_network` string, so a stand-in number
can never be mistaken for, or compared with, an Inception one.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from .feature_networks import CleanResize, FeatureNetwork
from .runtime import progress

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def center_crop_square(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top:top + side, left:left + side]


def center_crop_square_batch(batch: np.ndarray) -> np.ndarray:
    return np.stack([center_crop_square(image) for image in batch])


class ImageFileDataset(torch.utils.data.Dataset):
    """Image files as resized float tensors, read as RGB (grey and RGBA files included)."""

    def __init__(self, paths: Sequence[str | Path], resize: CleanResize, center_crop: bool) -> None:
        self.paths = list(paths)
        self.resize = resize
        self.center_crop = center_crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        try:
            with Image.open(self.paths[index]) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, ValueError) as error:  # truncated, corrupt, not an image
            raise UnreadableImageError(f"{self.paths[index]}: {error}") from error
        return self.resize(center_crop_square(array) if self.center_crop else array)


class UnreadableImageError(ValueError):
    """An image file of a set being scored that does not decode (the message names it)."""


@torch.no_grad()
def extract_features(network: FeatureNetwork, images: Sequence[str | Path] | Iterable[np.ndarray],
                     batch_size: int = 50, device: str | torch.device | None = None, num_workers: int = 0,
                     center_crop: bool = False, description: str = "Extracting features") -> dict:
    """Features of image files, or of in-memory uint8 batches [B, H, W, 3].

    `images`: a list of PNG/JPEG paths (read by a DataLoader; `center_crop` crops non-square files to
    their short side first, so that the resize to a square does not distort them), or an iterable of
    uint8 batches such as a DataLoader (one network call each; `batch_size` applies to files).
    `device`: where to run; default the network's own device.
    Returns {"pool", "spatial", "logits": float32 arrays [N, ...], "feature_network": network.name}.
    """
    if device is not None:
        network.to(device)
    if isinstance(images, Sequence) and len(images) and isinstance(images[0], (str, Path)):
        dataset = ImageFileDataset(images, network.resize, center_crop)
        source = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        batches = (network.resized_features(batch) for batch in source)
    else:  # consumed lazily: a DataLoader of full-size images need not fit in memory at once
        source = images
        batches = (network.features(center_crop_square_batch(batch) if center_crop else batch) for batch in source)
    total = len(source) if hasattr(source, "__len__") else None
    collected: dict[str, list[np.ndarray]] = {"pool": [], "spatial": [], "logits": []}
    for batch_features in progress(batches, total=total, desc=description, unit="batch"):
        for key, value in batch_features.items():
            collected[key].append(value)
    if not collected["pool"]:
        raise ValueError("no images to extract features from")
    features: dict = {key: np.concatenate(values) for key, values in collected.items()}
    features["feature_network"] = network.name
    return features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D]."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def set_statistics(features: dict) -> dict:
    """What a reference set must keep for every metric: pool / spatial statistics, the raw pool
    features (KID, precision / recall), the feature network and the number of images."""
    pool_mu, pool_sigma = feature_statistics(features["pool"])
    spatial_mu, spatial_sigma = feature_statistics(features["spatial"])
    return {"pool_mu": pool_mu, "pool_sigma": pool_sigma, "spatial_mu": spatial_mu, "spatial_sigma": spatial_sigma,
            "pool_features": np.asarray(features["pool"], dtype=np.float32),
            "feature_network": features["feature_network"], "num_images": len(features["pool"])}


def save_statistics(path: str | Path, features: dict, skipped: list[str] = (), provenance: dict | None = None) -> None:
    """Reference statistics of a feature dict (from `extract_features`) to an .npz, with the paths of the
    images that could not be used (`skipped`) and how they were computed (`provenance`, as JSON)."""
    stats = set_statistics(features)
    stats["skipped"] = np.array(list(skipped), dtype=str)
    stats["provenance"] = np.array(json.dumps(provenance or {}))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file object, so numpy keeps the exact name (no added .npz)
        np.savez(f, **stats)


def load_statistics(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        stats = {key: data[key] for key in data.files}
    stats["feature_network"] = str(stats["feature_network"])
    stats["num_images"] = int(stats["num_images"])
    stats["provenance"] = json.loads(str(stats["provenance"])) if "provenance" in stats else {}
    return stats


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d² = ||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), computed as pytorch-fid and
    ADM's evaluator do: sqrtm of the product, eps * I added to both covariances when the product is
    too singular for a finite root, and a negligible imaginary part dropped."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    # A feature constant in a set (a ReLU unit that never fires on its images: the smoke tier's random networks have
    # several) has a zero row and column in that set's covariance and makes the product exactly singular (scipy's
    # sqrtm then warns "Matrix is singular"). The root's trace depends only on the features alive in both sets (the
    # eigenvalues of sigma1 sigma2 are those of sqrt(sigma1) sigma2 sqrt(sigma1), whose other rows are zero): it is
    # taken over those, the other terms over all. The same distance.
    alive = (np.diagonal(sigma1) > 0) & (np.diagonal(sigma2) > 0)
    live = np.ix_(alive, alive)
    covmean = linalg.sqrtm(sigma1[live] @ sigma2[live])
    if not np.isfinite(covmean).all():
        warnings.warn(f"Frechet distance: singular covariance product; adding {eps} to the diagonals")
        offset = np.eye(len(covmean)) * eps
        covmean = linalg.sqrtm((sigma1[live] + offset) @ (sigma2[live] + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: imaginary component {np.abs(covmean.imag).max()} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_inception_distance(gen_features: np.ndarray, ref_features: np.ndarray, num_subsets: int,
                              max_subset_size: int, seed: int) -> tuple[float, float]:
    """KID: unbiased MMD² with the kernel k(x, y) = (x·y / d + 1)³, averaged over random subsets of
    size min(max_subset_size, n_gen, n_ref) drawn without replacement (clean-fid / torch-fidelity).
    Returns the mean and the standard deviation over the subsets."""
    gen = np.asarray(gen_features, dtype=np.float64)
    ref = np.asarray(ref_features, dtype=np.float64)
    dim = gen.shape[1]
    m = min(len(gen), len(ref), max_subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(gen)} and {len(ref)}")
    rng = np.random.default_rng(seed)
    estimates = np.empty(num_subsets)
    for i in progress(range(num_subsets), desc="KID subsets", leave=False):
        x = gen[rng.choice(len(gen), m, replace=False)]
        y = ref[rng.choice(len(ref), m, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        # Within-set means leave out the diagonal (k(x, x)): that is what makes the estimate unbiased.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
        estimates[i] = within - 2 * k_xy.mean()
    return float(estimates.mean()), float(estimates.std())


def inception_score(logits: np.ndarray, num_splits: int, seed: int) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits), over `num_splits` splits (fewer when
    there are fewer samples than splits). Returns the mean and std over the splits.

    The splits cut a seeded permutation of the samples, not the samples in file order: sample sets are
    written class by class, and contiguous splits would each hold a tenth of the classes, capping p(y)'s
    entropy and so the score (1000 classes x 50 confident samples: 100 instead of ~910). The permutation is
    `RandomState(seed).permutation` and split i is [i * n // k, (i + 1) * n // k), torch-fidelity's
    convention, so the two agree for the same seed."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    n = len(logits)
    splits = min(num_splits, n)
    log_probs = torch.log_softmax(logits[np.random.RandomState(seed).permutation(n)], dim=1)
    scores = []
    for i in range(splits):
        split = log_probs[i * n // splits:(i + 1) * n // splits]
        log_marginal = torch.logsumexp(split, dim=0) - np.log(len(split))
        kl = (split.exp() * (split - log_marginal)).sum(dim=1).mean()
        scores.append(kl.exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def _kth_neighbour_radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """Distance of every point to its k-th nearest neighbour in its own set (itself excluded)."""
    radii = [torch.cdist(rows, features).kthvalue(k + 1, dim=1).values  # the 1st is the point itself
             for rows in features.split(batch_size)]
    return torch.cat(radii)


def precision_recall(gen_features: np.ndarray, ref_features: np.ndarray, k: int, batch_size: int = 1024,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of
    balls reaching each point's k-th nearest neighbour; precision = share of generated samples inside
    the reference manifold, recall = share of reference samples inside the generated one."""
    gen = torch.as_tensor(np.asarray(gen_features), dtype=torch.float32, device=device)
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    if min(len(gen), len(ref)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {len(gen)} and {len(ref)}")
    ref_radii = _kth_neighbour_radii(ref, k, batch_size)
    gen_radii = _kth_neighbour_radii(gen, k, batch_size)
    gen_in_ref = torch.zeros(len(gen), dtype=torch.bool, device=device)
    ref_in_gen = torch.zeros(len(ref), dtype=torch.bool, device=device)
    start = 0
    for rows in gen.split(batch_size):  # one pass over the generated x reference distances
        distances = torch.cdist(rows, ref)
        gen_in_ref[start:start + len(rows)] = (distances <= ref_radii[None, :]).any(dim=1)
        ref_in_gen |= (distances <= gen_radii[start:start + len(rows), None]).any(dim=0)
        start += len(rows)
    return gen_in_ref.float().mean().item(), ref_in_gen.float().mean().item()


def compute_metrics(gen_features: dict, ref: dict, kid_subsets: int = 100, kid_subset_size: int = 1000,
                    is_splits: int = 10, pr_k: int = 3, seed: int = 0,
                    device: str | torch.device = "cpu") -> dict:
    """All metrics of generated features (from `extract_features`) against a reference: either its
    features (same form) or its statistics (`set_statistics` / `load_statistics`)."""
    if "pool_mu" not in ref:
        ref = set_statistics(ref)
    if gen_features["feature_network"] != ref["feature_network"]:
        raise ValueError(f"generated features from {gen_features['feature_network']!r} cannot be compared "
                         f"with reference statistics from {ref['feature_network']!r}")
    gen = set_statistics(gen_features)
    kid_mean, kid_std = kernel_inception_distance(gen_features["pool"], ref["pool_features"], kid_subsets,
                                                  kid_subset_size, seed)
    is_mean, is_std = inception_score(gen_features["logits"], is_splits, seed)
    precision, recall = precision_recall(gen_features["pool"], ref["pool_features"], pr_k, device=device)
    return {
        "feature_network": gen_features["feature_network"],
        "num_generated": gen["num_images"],
        "num_reference": int(ref["num_images"]),
        "fid": frechet_distance(gen["pool_mu"], gen["pool_sigma"], ref["pool_mu"], ref["pool_sigma"]),
        "sfid": frechet_distance(gen["spatial_mu"], gen["spatial_sigma"], ref["spatial_mu"], ref["spatial_sigma"]),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": min(gen["num_images"], len(ref["pool_features"]), kid_subset_size),
        "inception_score_mean": is_mean,
        "inception_score_std": is_std,
        "inception_score_splits": min(is_splits, gen["num_images"]),
        "precision": precision,
        "recall": recall,
        "precision_recall_k": pr_k,
    }
