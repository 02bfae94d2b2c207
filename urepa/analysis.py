"""Alignment analyses between U-Net features and DINOv2 tokens: CKNNA, CCA and t-SNE, and the stage that runs
them on a trained run's held-out images (`alignment_analysis`).

Inputs are per-image features [B, D] or tokens [B, N, D] (torch or numpy); tokens are mean-pooled
over N into one vector per image where a per-image measure is needed. Scores are read against their
chance level: the same score with the images of one side shuffled.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .images import dinov2_transform, image_batch, open_rgb, vae_transform
from .runtime import provenance
from .vae import LatentNormalisation

log = logging.getLogger(__name__)


def _per_image(x) -> np.ndarray:
    x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    return x.mean(axis=1) if x.ndim == 3 else x


def _hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC estimator, as the Platonic-representation code uses it."""
    m = k.shape[0]
    k, l = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    value = (k * l.T).sum() + k.sum() * l.sum() / ((m - 1) * (m - 2)) - 2 * (k @ l).sum() / (m - 2)
    return value / (m * (m - 3))


def cknna(feats_a, feats_b, topk: int = 10) -> float:
    """Centered Kernel Nearest-Neighbour Alignment (Huh et al. 2024, used by REPA to measure alignment).

    Linear kernels of the L2-normalised per-image features; only pairs that are among each other's
    top-k neighbours in both kernels count; unbiased-HSIC alignment of the masked kernels, normalised
    by each kernel's alignment with itself. 1 for identical geometry, about 0 for unrelated features.
    """
    a = torch.nn.functional.normalize(torch.from_numpy(_per_image(feats_a)), dim=-1)
    b = torch.nn.functional.normalize(torch.from_numpy(_per_image(feats_b)), dim=-1)
    n = a.shape[0]
    if n < 5:
        raise ValueError(f"CKNNA needs at least 5 images, got {n}")
    topk = min(topk, n - 2)
    k, l = a @ a.T, b @ b.T

    def masked_hsic(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def neighbours(g: torch.Tensor) -> torch.Tensor:
            g = g.clone().fill_diagonal_(float("-inf"))
            return torch.zeros_like(g).scatter_(1, g.topk(topk, dim=1).indices, 1.0)

        mask = neighbours(x) * neighbours(y)
        return _hsic_unbiased(mask * x, mask * y)

    return float(masked_hsic(k, l) / (torch.sqrt(masked_hsic(k, k) * masked_hsic(l, l)) + 1e-12))


def cca_score(pred, target, n_components: int = 10, seed: int = 0) -> dict:
    """Mean held-out canonical correlation between per-image U-Net and DINOv2 features (the plan's CCA score).

    The first n // 2 images of `default_rng(seed).permutation(n)` fit the projections, the others are
    scored. Fitted and scored on the same images, CCA of a few hundred images in 32 dimensions finds
    correlations of ~0.5 between unrelated features; held out, unrelated features score about 0. Each
    side is first reduced by PCA fitted on the fit half, to at most n_fit // 4 dimensions (32 at most),
    by an exact SVD (sklearn's default switches to a randomised one above 500 features, which moves the
    score by up to 0.02); the number of canonical pairs is clamped to that. The CCA itself is solved in
    closed form (QR of each side, SVD of the product of the Q factors: Björck & Golub 1973); sklearn's
    iterative CCA misses it by up to ~2e-3 when canonical correlations are close.
    """
    from sklearn.decomposition import PCA

    x, y = _per_image(pred), _per_image(target)
    n = len(x)
    if n < 8:
        raise ValueError(f"held-out CCA needs at least 8 images, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    fit, scored = order[:n // 2], order[n // 2:]
    dims = max(1, min(32, len(fit) // 4, x.shape[1], y.shape[1]))
    components = min(n_components, dims)

    def reduced(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pca = PCA(dims, svd_solver="full").fit(features[fit])  # centred on the fit half's mean
        return pca.transform(features[fit]), pca.transform(features[scored])

    (x_fit, x_scored), (y_fit, y_scored) = reduced(x), reduced(y)
    q_x, r_x = np.linalg.qr(x_fit)
    q_y, r_y = np.linalg.qr(y_fit)
    u, _, vt = np.linalg.svd(q_x.T @ q_y)
    x_weights = np.linalg.solve(r_x, u[:, :components])
    y_weights = np.linalg.solve(r_y, vt[:components].T)
    x_canonical, y_canonical = x_scored @ x_weights, y_scored @ y_weights
    correlations = [float(np.corrcoef(x_canonical[:, i], y_canonical[:, i])[0, 1]) for i in range(components)]
    return {"cca": float(np.mean(correlations)), "cca_components": components, "cca_pca_dims": dims,
            "cca_fit_images": len(fit), "cca_scored_images": len(scored)}


def shuffled_pairings(n: int, seed: int, count: int = 10) -> list[np.ndarray]:
    """`count` seeded permutations of n images. Pairing image i's features with image perm[i]'s
    target keeps both sets' own structure (clusters, dimension, scale) and breaks only the
    correspondence: a score on such pairings is the score's chance level."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(count)]


def chance_level(score, pred, target, pairings: list[np.ndarray]) -> float:
    """Mean of `score(pred, target)` with the target's images shuffled by each of `pairings`."""
    target = _per_image(target)
    return float(np.mean([score(pred, target[perm]) for perm in pairings]))


def alignment_scores(pred, target, pairings: list[np.ndarray], seed: int = 0) -> dict:
    """CKNNA and held-out CCA of per-image features against the target's, each beside its chance level
    (`*_chance`: the mean of the same score over the shuffled `pairings`)."""
    result = {"cknna": cknna(pred, target), "cknna_chance": chance_level(cknna, pred, target, pairings)}
    result.update(cca_score(pred, target, seed=seed))
    result["cca_chance"] = chance_level(lambda p, t: cca_score(p, t, seed=seed)["cca"], pred, target, pairings)
    return result


TSNE_PANELS = ("U-Net features (pooled)", "DINOv2 tokens (pooled)", "align head + DINOv2, one map")


def tsne_plot(features, target, labels, path: str | Path, head_tokens=None, class_names: dict | None = None,
              seed: int = 0, title: str = "") -> np.ndarray:
    """t-SNE of image-pooled, L2-normalised features, coloured by class, in the same three panels for every run,
    so maps are compared panel by panel across runs: the raw U-Net features of the analysis layer (every run has
    them, the baseline included), DINOv2's tokens, and the align head's tokens with DINOv2's in one joint map
    (circles U-Net, crosses DINOv2: the head is trained into DINOv2's space, so their overlap is visible), which
    says "no align head" for a run without one. The class legend names each colour (`class_names[class id]`,
    else the id). Returns the 2-D coordinates: the U-Net map, the DINOv2 map, then (with a head) the joint map's
    head rows and DINOv2 rows.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from sklearn.manifold import TSNE

    def normalised(x):
        x = _per_image(x)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def embed(x):
        return TSNE(2, perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed, init="pca").fit_transform(x)

    f, t = normalised(features), normalised(target)
    labels = np.asarray(labels)
    maps = [embed(f), embed(t)]
    if head_tokens is not None:
        h = normalised(head_tokens)
        if h.shape[1] != t.shape[1]:
            raise ValueError(f"a joint t-SNE map needs one space: align head {h.shape[1]}-d vs DINOv2 {t.shape[1]}-d")
        maps.append(embed(np.concatenate([h, t])))
    classes = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "turbo")
    colour = {c: cmap(i if len(classes) <= 20 else i / max(1, len(classes) - 1)) for i, c in enumerate(classes)}
    colours = [colour[c] for c in labels.tolist()]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    panels = [(axes[0], maps[0], "o"), (axes[1], maps[1], "x")]
    if head_tokens is not None:
        panels += [(axes[2], maps[2][:len(h)], "o"), (axes[2], maps[2][len(h):], "x")]
    else:
        axes[2].text(0.5, 0.5, "no align head (λ = 0):\nno head tokens to map", ha="center", va="center",
                     transform=axes[2].transAxes)
    for ax, xy, marker in panels:
        ax.scatter(xy[:, 0], xy[:, 1], c=colours, marker=marker, s=28)
    for ax, name in zip(axes, TSNE_PANELS):
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    names = class_names or {}
    handles = [Line2D([], [], linestyle="", marker="o", color=colour[c], label=str(names.get(c, c))) for c in classes]
    handles += [Line2D([], [], linestyle="", marker=m, color="grey", label=source)
                for m, source in (("o", "U-Net"), ("x", "DINOv2"))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)
    fig.suptitle(title)
    rows = 1 + (len(handles) - 1) // 8
    fig.tight_layout(rect=(0, 0.05 * rows, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return np.concatenate(maps)


def held_out_rows(val_csv: str | Path, count: int, skipped: list | None = None) -> pd.DataFrame:
    """A fixed, class-balanced held-out batch: the first usable images of each class in turn. Unusable files
    are passed over (named in the log, and appended to `skipped` when given); only candidates are opened."""
    table = pd.read_csv(val_csv)
    table["rank"] = table.groupby("class_id").cumcount()
    chosen = []
    for index, path in table.sort_values(["rank", "class_id"])["img_path"].items():
        if len(chosen) == count:
            break
        try:
            open_rgb(path)
            chosen.append(index)
        except Exception as error:  # corrupt, truncated, missing, unsupported or too small file
            log.warning("skipping validation image %s: %s: %s", path, type(error).__name__, error)
            if skipped is not None:
                skipped.append(path)
    return table.loc[chosen].reset_index(drop=True)


def analysis_layer(align_layers: list[str]) -> str:
    """The layer every ablation is analysed at: `mid` whenever it is aligned (the default, and the
    baseline's), so that scores compare the same features across ablations."""
    return "mid" if "mid" in align_layers else align_layers[0]


@torch.no_grad()
def alignment_analysis(val_csv, sd15_dir, dinov2_path, weights_dir, clip_embeddings: np.ndarray, image_size: int,
                       dino_size: int, count: int, timesteps: list[int], seed: int, device: torch.device,
                       tsne_png: str | Path, batch_size: int = 32, vae_dir: str | Path | None = None,
                       class_names: dict[int, str] | None = None) -> dict:
    """Compare the fine-tuned U-Net's features on held-out images with DINOv2's tokens of the same images.
    The images are encoded with the VAE the weights were trained on (`vae_dir`, checked against their
    weights.json; default: the folder it records) and normalised as in training.

    Per timestep: CKNNA and held-out CCA between image-pooled U-Net features of the analysis layer (no
    head: comparable across ablations, the baseline included) and pooled DINOv2 tokens; where align
    heads were trained, also the mean token cosine and CKNNA of the heads' tokens. Every score comes
    with its chance level (`*_chance`): its mean over seeded shuffled pairings of the images, which
    keep each side's own structure and break only the correspondence. t-SNE at the middle
    timestep (`tsne_plot`, classes named by `class_names`).
    Images go through the encoders `batch_size` at a time; the noise is drawn once for the whole set,
    so the scores do not depend on the batch size.
    """
    from .dinov2 import load_dinov2
    from .export import head_target_norm, load_align_head, load_finetuned_pipeline, read_description
    from .losses import spatial_normalise
    from .models import FeatureCapture
    from .sd15 import load_noise_scheduler

    skipped: list[str] = []
    rows = held_out_rows(val_csv, count, skipped)
    log.info("alignment of %s: %d held-out images of %s (%d unusable skipped), timesteps %s", weights_dir, len(rows),
             val_csv, len(skipped), timesteps)
    chunks = [rows["img_path"].iloc[i:i + batch_size].tolist() for i in range(0, len(rows), batch_size)]

    encoder = load_dinov2(dinov2_path, device)
    to_dino = dinov2_transform(image_size, dino_size)
    dino_tokens = torch.cat([encoder(image_batch(paths, to_dino).to(device)).float().cpu() for paths in chunks])
    del encoder
    dino_pooled = dino_tokens.mean(dim=1)

    pipe = load_finetuned_pipeline(sd15_dir, weights_dir, device, dtype=torch.float32, vae_dir=vae_dir)
    to_vae = vae_transform(image_size)
    latents = torch.cat([pipe.vae.encode(image_batch(paths, to_vae).to(device)).latent_dist.mean.cpu()
                         for paths in chunks])
    latents = LatentNormalisation.from_config(pipe.vae.config).normalise(latents)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    cond = torch.from_numpy(np.asarray(clip_embeddings)[rows["class_id"].to_numpy()]).float()
    layer = analysis_layer(read_description(weights_dir)["align_layers"])
    head = load_align_head(weights_dir, layer, device)
    # a head is scored against the targets it was trained towards: iREPA's spatially normalised tokens, unit length
    alpha = head_target_norm(weights_dir)
    head_targets = dino_tokens if alpha is None else \
        torch.nn.functional.normalize(spatial_normalise(dino_tokens, alpha), dim=-1)
    capture = FeatureCapture(pipe.unet, [layer])
    scheduler = load_noise_scheduler(sd15_dir)
    middle = timesteps[len(timesteps) // 2]
    pairings = shuffled_pairings(len(rows), seed)
    results, at_middle, head_at_middle = [], None, None
    for t in timesteps:
        pooled, head_pooled, head_cosine, head_cosine_chance = [], [], [], []
        for start in range(0, len(rows), batch_size):
            part = slice(start, start + batch_size)
            timestep = torch.full((len(latents[part]),), t, dtype=torch.long)
            noisy = scheduler.add_noise(latents[part], noise[part], timestep)
            pipe.unet(noisy.to(device), timestep.to(device), encoder_hidden_states=cond[part].to(device))
            features = capture.pop()[layer].float()
            pooled.append(features.mean(dim=(2, 3)).cpu())
            if head is not None:
                tokens = head(features).cpu()
                head_pooled.append(tokens.mean(dim=1))
                head_cosine.append((tokens * head_targets[part]).sum(-1).mean(dim=1))
                head_cosine_chance.append(torch.stack([(tokens * head_targets[perm[part]]).sum(-1).mean(dim=1)
                                                       for perm in pairings]))
        pooled = torch.cat(pooled)
        entry = {"timestep": t, **alignment_scores(pooled, dino_pooled, pairings, seed)}
        if head is not None:
            head_pooled = torch.cat(head_pooled)
            entry["head_token_cosine"] = float(torch.cat(head_cosine).mean())
            entry["head_token_cosine_chance"] = float(torch.cat(head_cosine_chance, dim=1).mean())
            entry["head_cknna"] = cknna(head_pooled, dino_pooled)
            entry["head_cknna_chance"] = chance_level(cknna, head_pooled, dino_pooled, pairings)
        results.append(entry)
        if t == middle:
            at_middle, head_at_middle = pooled, (head_pooled if head is not None else None)
    capture.remove()
    for entry in results:
        log.info("t = %d: CKNNA %.3f (chance %.3f), CCA %.3f (chance %.3f)%s", entry["timestep"], entry["cknna"],
                 entry["cknna_chance"], entry["cca"], entry["cca_chance"],
                 f", head token cosine {entry['head_token_cosine']:.3f}" if head is not None else "")
    tsne_plot(at_middle, dino_pooled, rows["class_id"].to_numpy(), tsne_png, head_at_middle, class_names, seed=seed,
              title=f"t-SNE at t = {middle}, layer {layer}: U-Net features, DINOv2 tokens, and both in one map")
    log.info("t-SNE at t = %d written to %s", middle, tsne_png)
    return {"layer": layer, "images": len(rows), "skipped_images": skipped, "has_head": head is not None,
            "timesteps": results, "provenance": provenance(device, batch_size=batch_size)}
