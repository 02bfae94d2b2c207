"""Linear probe: how linearly the classes can be read from a U-Net's pooled features of the aligned layer at one
noise level, beside DINOv2's own features (the ceiling alignment aims at) and chance (1 / classes).

A scikit-learn logistic regression on standardised features, with one fixed C for every model (`probe_classifier`),
is fitted on a class-balanced probe set of the train subset (`probe_rows`) and scored (top-1) on the validation
subset. The U-Net sees each image's latents noised to the probe timestep with noise seeded by the image's id
(`image_noise`), so every model sees the same noisy latents, and the empty prompt: with the class prompt the
features would carry the label through cross-attention, and even random weights would score well. Train latents and
DINOv2 tokens come from the caches (rows of subset.csv); validation images are encoded here, rounded to float16 as
the caches store them.
"""
from __future__ import annotations

import hashlib
import logging

import numpy as np
import pandas as pd
import torch

from .analysis import analysis_layer, held_out_rows
from .digests import file_digest, weights_fingerprint
from .images import dinov2_transform, dinov2_view, image_batch, vae_transform
from .rowstore import check_cache, open_arrays, valid_rows
from .runtime import provenance
from .vae import LatentNormalisation, check_same_vae, vae_record

log = logging.getLogger(__name__)


def probe_classifier(C: float, max_iter: int):
    """The probe: features standardised on the probe set, then multinomial L2 logistic regression at a fixed `C`
    (not tuned on the validation images, which would flatter every row; the same for every model, so rows differ
    only in their features)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))


def fit_and_score(train_x, train_y, val_x, val_y, C: float, max_iter: int) -> dict:
    """Fit `probe_classifier` on (train_x, train_y); top-1 accuracy on the validation features, on the training
    features (near 1: the classes are separable at this size), and chance: 1 / the number of classes."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least two classes, got {classes.tolist()}")
    probe = probe_classifier(C, max_iter)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        probe.fit(np.asarray(train_x, dtype=np.float64), train_y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    if not converged:
        log.warning("the probe did not converge in %d iterations (C %g): its accuracy is that of an unfinished fit",
                    max_iter, C)
    return {"top1": float(probe.score(np.asarray(val_x, dtype=np.float64), val_y)),
            "train_top1": float(probe.score(np.asarray(train_x, dtype=np.float64), train_y)),
            "chance": 1.0 / len(classes), "classes": len(classes), "train_images": len(train_y),
            "val_images": len(val_y), "features": int(np.shape(train_x)[1]), "C": C, "max_iter": max_iter,
            "iterations": int(np.max(probe[-1].n_iter_)), "converged": converged}


def probe_rows(table: pd.DataFrame, valid: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """The probe set: `per_class` rows of each class of the train subset `table`, drawn among the `valid` cache
    rows by a generator seeded with (seed, class id), sorted. The same for every model of a tier."""
    usable = table.loc[np.asarray(valid)]
    chosen = []
    for class_id, rows in usable.groupby("class_id").groups.items():
        if len(rows) < per_class:
            raise ValueError(f"probe.train_images_per_class is {per_class} but class {class_id} has {len(rows)} "
                             f"usable rows in the train subset: lower it, or raise the tier's images_per_class")
        rng = np.random.default_rng([seed, int(class_id)])
        chosen.extend(rng.choice(np.asarray(rows), per_class, replace=False).tolist())
    missing = set(table["class_id"]) - set(usable["class_id"])
    if missing:
        raise ValueError(f"classes {sorted(missing)} have no usable row in the train subset")
    return np.sort(np.asarray(chosen, dtype=np.int64))


def noise_seed(seed: int, image_id: str) -> int:
    """The seed of one image's probe noise: its id (the file stem) and the data seed, nothing else."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{image_id}".encode()).digest()[:8], "little")


def image_noise(shape: tuple[int, ...], image_ids, seed: int) -> torch.Tensor:
    """Gaussian noise [len(image_ids), *shape], each image's drawn from its own `noise_seed`."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, str(i))))
                        for i in image_ids])


@torch.no_grad()
def pooled_unet_features(unet, latents: torch.Tensor, image_ids, null_embedding, layer: str, timestep: int,
                         noise_scheduler, seed: int, device: torch.device) -> torch.Tensor:
    """Spatially pooled feature map of `layer` [B, C] for normalised latents [B, 4, h, w], noised to `timestep`
    with each image's seeded noise, under the empty prompt `null_embedding` [77, D]."""
    from .models import FeatureCapture

    noise = image_noise(tuple(latents.shape[1:]), image_ids, seed)
    steps = torch.full((len(latents),), timestep, dtype=torch.long)
    noisy = noise_scheduler.add_noise(latents.float(), noise, steps)
    condition = torch.as_tensor(np.asarray(null_embedding), dtype=torch.float32).expand(len(latents), -1, -1)
    capture = FeatureCapture(unet, [layer])
    try:
        unet(noisy.to(device), steps.to(device), encoder_hidden_states=condition.to(device))
        return capture.pop()[layer].float().mean(dim=(2, 3)).cpu()
    finally:
        capture.remove()


def _batches(count: int, batch_size: int) -> list[slice]:
    return [slice(start, start + batch_size) for start in range(0, count, batch_size)]


def probe_sets(csv, val_csv, valid: np.ndarray, train_per_class: int, val_per_class: int | None,
               seed: int) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(train rows with their subset.csv row as `row`, validation rows, unusable validation files skipped)."""
    table = pd.read_csv(csv)
    train = table.loc[probe_rows(table, valid, train_per_class, seed)].rename_axis("row").reset_index()
    val_table = pd.read_csv(val_csv)
    count = len(val_table) if val_per_class is None else val_per_class * val_table["class_id"].nunique()
    skipped: list[str] = []
    val = held_out_rows(val_csv, count, skipped)
    return train, val, skipped


def _checked_caches(csv, latent_cache, dino_cache, image_size: int):
    digest = file_digest(csv)
    latents = check_cache(latent_cache, {"csv_sha256": digest, "image_size": image_size})
    dino = check_cache(dino_cache, {"csv_sha256": digest})
    return latents, dino


@torch.no_grad()
def probe_unet(csv, val_csv, sd15_dir, weights_dir, vae_dir, latent_cache, dino_cache, null_embedding,
               image_size: int, settings: dict, seed: int, device: torch.device, batch_size: int,
               layer: str | None = None) -> dict:
    """The probe of one U-Net: a weights folder's (its EMA export; layer: the one it is analysed at,
    `analysis.analysis_layer`), or, with `weights_dir` None, SD-1.5's U-Net as it is at `layer` (no fine-tuned
    weights loaded). `vae_dir` is the VAE the latents are of (a weights folder's must be the one it records); the
    latent cache must hold that VAE's latents. `settings`: the `probe` config (timestep, train_images_per_class,
    val_images_per_class, C, max_iter)."""
    from .export import load_finetuned_pipeline, read_description
    from .sd15 import load_noise_scheduler, load_unet
    from .vae import load_autoencoder

    if weights_dir is None:
        unet, vae, record = load_unet(sd15_dir, device), load_autoencoder(vae_dir, device), vae_record("sd15", vae_dir)
        what = f"SD-1.5's U-Net as it is ({sd15_dir})"
    else:
        pipe = load_finetuned_pipeline(sd15_dir, weights_dir, device, dtype=torch.float32, vae_dir=vae_dir)
        unet, vae, record = pipe.unet, pipe.vae, pipe.vae_record
        layer = analysis_layer(read_description(weights_dir)["align_layers"])
        what = f"weights {weights_dir}"
    unet.eval()
    latents_group, dino_group = _checked_caches(csv, latent_cache, dino_cache, image_size)
    check_same_vae(latents_group.attrs["vae"], record, f"latent cache {latent_cache}")
    train, val, skipped = probe_sets(csv, val_csv, valid_rows(latents_group, dino_group),
                                     settings["train_images_per_class"], settings["val_images_per_class"], seed)
    log.info("probe of %s at %s, t = %d: %d train images, %d validation images (%d unusable skipped)", what, layer,
             settings["timestep"], len(train), len(val), len(skipped))
    normalisation = LatentNormalisation.from_config(vae.config)
    scheduler = load_noise_scheduler(sd15_dir)
    means = open_arrays(latent_cache, ["mean"])["mean"]

    def features(rows: pd.DataFrame, latents_of) -> np.ndarray:
        parts = []
        for part in _batches(len(rows), batch_size):
            latents = normalisation.normalise(latents_of(rows.iloc[part]).float())
            parts.append(pooled_unet_features(unet, latents, rows["id"].iloc[part].astype(str), null_embedding,
                                              layer, settings["timestep"], scheduler, seed, device))
        return torch.cat(parts).numpy()

    def cached(rows):  # float16 posterior means, raw
        return torch.from_numpy(means.get_orthogonal_selection((rows["row"].to_numpy(),)))

    to_vae = vae_transform(image_size)

    def encoded(rows):  # rounded to float16 as the cache stores them, so both sets' latents are alike
        images = image_batch(rows["img_path"].tolist(), to_vae).to(device)
        return vae.encode(images).latent_dist.mean.half().cpu()

    result = fit_and_score(features(train, cached), train["class_id"], features(val, encoded), val["class_id"],
                           settings["C"], settings["max_iter"])
    log.info("probe of %s: top-1 %.3f (train %.3f, chance %.3f)", what, result["top1"], result["train_top1"],
             result["chance"])
    return {"model": "pretrained" if weights_dir is None else "weights", "weights": None if weights_dir is None
            else str(weights_dir), "layer": layer, "timestep": settings["timestep"], "vae": record["name"], **result,
            "skipped_images": skipped, "provenance": provenance(device, batch_size=batch_size)}


@torch.no_grad()
def probe_dinov2(csv, val_csv, dinov2_path, latent_cache, dino_cache, image_size: int, dino_size: int,
                 settings: dict, seed: int, device: torch.device, batch_size: int) -> dict:
    """The ceiling: the same probe on DINOv2's mean-pooled patch tokens of the same images (the cache's for the
    probe set, computed here with the cache's view for the validation images)."""
    from .dinov2 import load_dinov2

    latents_group, dino_group = _checked_caches(csv, latent_cache, dino_cache, image_size)
    check_cache(dino_cache, {"encoder_fingerprint": weights_fingerprint(dinov2_path),
                             "view": dinov2_view(image_size, dino_size)})
    train, val, skipped = probe_sets(csv, val_csv, valid_rows(latents_group, dino_group),
                                     settings["train_images_per_class"], settings["val_images_per_class"], seed)
    tokens = open_arrays(dino_cache, ["tokens"])["tokens"]
    train_x = torch.cat([torch.from_numpy(tokens.get_orthogonal_selection((train["row"].to_numpy()[part],)))
                         .float().mean(dim=1) for part in _batches(len(train), batch_size)])
    encoder = load_dinov2(dinov2_path, device)
    to_dino = dinov2_transform(image_size, dino_size)
    val_x = torch.cat([encoder(image_batch(val["img_path"].iloc[part].tolist(), to_dino).to(device)).half().float()
                       .mean(dim=1).cpu() for part in _batches(len(val), batch_size)])
    result = fit_and_score(train_x.numpy(), train["class_id"], val_x.numpy(), val["class_id"], settings["C"],
                           settings["max_iter"])
    log.info("probe of DINOv2 (%s): top-1 %.3f (train %.3f, chance %.3f)", dinov2_path, result["top1"],
             result["train_top1"], result["chance"])
    return {"model": "dinov2", "weights": str(dinov2_path), "layer": "pooled patch tokens", "timestep": None,
            **result, "skipped_images": skipped, "provenance": provenance(device, batch_size=batch_size)}
