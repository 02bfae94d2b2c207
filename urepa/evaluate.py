"""Stage 5: reference statistics, sample-set metrics, FID-vs-step curves and the alignment analyses."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from . import metrics
from .caches import open_rgb
from .runtime import provenance
from .sample import sample_paths

log = logging.getLogger(__name__)


class SquareImages(Dataset):
    """Reference images prepared like samples: shorter side to `size` (bicubic), centre crop, uint8 HWC.
    Items are (array or None, path, problem): an unusable file is reported, not raised, so one damaged
    validation image is skipped and named instead of stopping the job."""

    def __init__(self, paths: list[str], size: int):
        self.paths = paths
        self.transform = transforms.Compose([
            transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(size),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, str, str]:
        try:
            return np.asarray(self.transform(open_rgb(self.paths[i]))), self.paths[i], ""
        except Exception as error:  # corrupt, truncated, missing, unsupported or too small file
            return None, self.paths[i], f"{type(error).__name__}: {error}"


def reference_statistics(val_csv: str | Path, image_size: int, network, out_npz: str | Path, batch_size: int,
                         num_workers: int = 0) -> None:
    """Feature statistics of the tier's validation subset, computed once and shared by all ablations.
    Unusable images are skipped, each named in the log, and counted in the statistics (`skipped`)."""
    paths = pd.read_csv(val_csv)["img_path"].tolist()
    loader = DataLoader(SquareImages(paths, image_size), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=list)
    skipped = []

    def usable_batches():
        for items in loader:
            for _, path, problem in items:
                if problem:
                    log.warning("skipping validation image %s: %s", path, problem)
                    skipped.append(path)
            if usable := [array for array, _, problem in items if not problem]:
                yield np.stack(usable)

    features = metrics.extract_features(network, usable_batches(), description="reference features")
    metrics.save_statistics(out_npz, features, skipped=skipped,
                            provenance=provenance(network.device, batch_size=batch_size, num_workers=num_workers))
    log.info("reference statistics of %d images with %s (%d skipped)", len(paths) - len(skipped),
             features["feature_network"], len(skipped))


def score_samples(samples_dir: str | Path, reference_npz: str | Path, network, batch_size: int,
                  extra: dict) -> dict:
    """All metrics of a sample folder against the reference statistics, plus `extra` provenance."""
    paths = sample_paths(samples_dir)
    features = metrics.extract_features(network, paths, batch_size=batch_size, description="sample features")
    # Precision / recall compares every sample with every reference image (50k x 50k at 2048-d): on
    # the feature network's device, the GPU where there is one.
    reference = metrics.load_statistics(reference_npz)
    result = metrics.compute_metrics(features, reference, device=network.device)
    sessions = Path(samples_dir) / "provenance.json"
    return {**result, "num_reference_skipped": len(reference.get("skipped", [])), **extra,
            "provenance": {"metrics": provenance(network.device, batch_size=batch_size),
                           "samples": json.loads(sessions.read_text()) if sessions.exists() else [],
                           "reference": reference["provenance"]}}


def steps_to_target(points: list[dict], target: float | None) -> int | None:
    """The first training step whose FID is at or below the target."""
    if target is None:
        return None
    return next((p["step"] for p in sorted(points, key=lambda p: p["step"]) if p["fid"] <= target), None)


def fid_curve(point_files: list[str | Path]) -> dict:
    points = []
    for path in point_files:
        m = json.loads(Path(path).read_text())
        points.append({"step": m["checkpoint_step"], "fid": m["fid"], "sfid": m["sfid"], "kid_mean": m["kid_mean"],
                       "num_samples": m["num_generated"]})
    return {"points": sorted(points, key=lambda p: p["step"])}


SWEEP_METRICS = ("fid", "sfid", "precision", "recall", "inception_score_mean", "num_generated")


def cfg_sweep(point_files: list[str | Path]) -> dict:
    """One run's metrics against the guidance scale (same weights, sampler, images and seed at every scale),
    and the scale with the lowest FID."""
    points = []
    for path in point_files:
        m = json.loads(Path(path).read_text())
        points.append({"cfg_scale": m["sampling"]["cfg_scale"], **{k: m[k] for k in SWEEP_METRICS},
                       "sampling": m["sampling"]})
    if not points:
        raise ValueError("a CFG sweep needs at least one scale")
    points.sort(key=lambda p: p["cfg_scale"])
    best = min(points, key=lambda p: p["fid"])
    return {"points": points, "best": {k: v for k, v in best.items() if k != "sampling"}}


def add_targets(curves: dict[str, dict[int, dict]], target_fid: float | None) -> float | None:
    """Set each run's (`curves[ablation][seed]`) target and first step reaching it. Target: the configured FID,
    else the baseline's final FID (mean over its seeds) when the baseline is compared: how soon each run
    matches the baseline."""
    baseline_finals = [c["points"][-1]["fid"] for c in curves.get("baseline", {}).values() if c["points"]]
    if target_fid is None and baseline_finals:
        target_fid = float(np.mean(baseline_finals))
    for by_seed in curves.values():
        for curve in by_seed.values():
            curve["target_fid"] = target_fid
            curve["steps_to_target"] = steps_to_target(curve["points"], target_fid)
    return target_fid


# -- alignment analyses ---------------------------------------------------------------------------
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


def load_align_head(weights_dir: str | Path, layer: str, device: torch.device):
    """The trained align head of `layer` from a weights folder, or None where no head was trained."""
    from safetensors.torch import load_file

    from .models import AlignHead

    heads_file = Path(weights_dir) / "align_heads.safetensors"
    if not heads_file.exists():
        return None
    head_config = json.loads((Path(weights_dir) / "align_heads.json").read_text())
    prefix = f"{layer}."
    state = {k[len(prefix):]: v for k, v in load_file(heads_file).items() if k.startswith(prefix)}
    head = AlignHead(state["proj.0.weight"].shape[1], head_config["dim"], head_config["grid"],
                     head_config["projector"], head_config["projector_hidden"])
    head.load_state_dict(state)
    return head.to(device).eval()


@torch.no_grad()
def alignment_analysis(val_csv, sd15_dir, dinov2_path, weights_dir, clip_embeddings: np.ndarray, settings: dict,
                       image_size: int, dino_size: int, count: int, timesteps: list[int],
                       seed: int, device: torch.device, tsne_png: str | Path, batch_size: int = 32) -> dict:
    """Compare the fine-tuned U-Net's features on held-out images with DINOv2's tokens of the same images.

    Per timestep: CKNNA and held-out CCA between image-pooled U-Net features of the analysis layer (no
    head: comparable across ablations, the baseline included) and pooled DINOv2 tokens; where align
    heads were trained, also the mean token cosine and CKNNA of the heads' tokens. Every score comes
    with its chance level (`*_chance`): its mean over seeded shuffled pairings of the images, which
    keep each side's own structure and break only the correspondence. t-SNE at the middle
    timestep: head tokens and DINOv2 tokens in one map, or the raw features beside DINOv2's without a head.
    Images go through the encoders `batch_size` at a time; the noise is drawn once for the whole set,
    so the scores do not depend on the batch size.
    """
    from . import analysis
    from .caches import vae_transform
    from .dinov2 import dinov2_transform, load_dinov2
    from .models import FeatureCapture
    from .sample import load_finetuned_pipeline
    from .sd15 import load_noise_scheduler

    skipped: list[str] = []
    rows = held_out_rows(val_csv, count, skipped)
    chunks = [rows["img_path"].iloc[i:i + batch_size].tolist() for i in range(0, len(rows), batch_size)]

    def images(paths, transform) -> torch.Tensor:
        tensors = []
        for path in paths:
            tensors.append(transform(open_rgb(path)))
        return torch.stack(tensors).to(device)

    encoder = load_dinov2(dinov2_path, device)
    to_dino = dinov2_transform(image_size, dino_size)
    dino_tokens = torch.cat([encoder(images(paths, to_dino)).float().cpu() for paths in chunks])
    del encoder
    dino_pooled = dino_tokens.mean(dim=1)

    pipe = load_finetuned_pipeline(sd15_dir, weights_dir, settings["finetune"], device, dtype=torch.float32)
    to_vae = vae_transform(image_size)
    latents = torch.cat([pipe.vae.encode(images(paths, to_vae)).latent_dist.mean.cpu() for paths in chunks])
    latents = latents * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    cond = torch.from_numpy(np.asarray(clip_embeddings)[rows["class_id"].to_numpy()]).float()
    layer = analysis_layer(settings["align_layers"])
    head = load_align_head(weights_dir, layer, device)
    capture = FeatureCapture(pipe.unet, [layer])
    scheduler = load_noise_scheduler(sd15_dir)
    middle = timesteps[len(timesteps) // 2]
    pairings = analysis.shuffled_pairings(len(rows), seed)
    results, at_middle = [], None
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
                head_cosine.append((tokens * dino_tokens[part]).sum(-1).mean(dim=1))
                head_cosine_chance.append(torch.stack([(tokens * dino_tokens[perm[part]]).sum(-1).mean(dim=1)
                                                       for perm in pairings]))
        pooled = torch.cat(pooled)
        entry = {"timestep": t, **analysis.alignment_scores(pooled, dino_pooled, pairings, seed)}
        if head is not None:
            head_pooled = torch.cat(head_pooled)
            entry["head_token_cosine"] = float(torch.cat(head_cosine).mean())
            entry["head_token_cosine_chance"] = float(torch.cat(head_cosine_chance, dim=1).mean())
            entry["head_cknna"] = analysis.cknna(head_pooled, dino_pooled)
            entry["head_cknna_chance"] = analysis.chance_level(analysis.cknna, head_pooled, dino_pooled, pairings)
        results.append(entry)
        if t == middle:
            at_middle = head_pooled if head is not None else pooled
    capture.remove()
    analysis.tsne_plot(at_middle, dino_pooled, rows["class_id"].to_numpy(), tsne_png, head is not None, seed=seed,
                       title=f"t = {middle}: {'align-head' if head else 'raw U-Net'} tokens ({layer}) vs DINOv2")
    return {"layer": layer, "images": len(rows), "skipped_images": skipped, "has_head": head is not None,
            "timesteps": results, "provenance": provenance(device, batch_size=batch_size)}
