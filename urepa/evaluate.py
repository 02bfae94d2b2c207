"""Stage 5: reference statistics and sample-set metrics (FID-vs-step curves and CFG sweeps are in urepa.curves, the
alignment analyses in urepa.analysis)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from . import metrics
from .images import open_rgb
from .runtime import provenance, set_aside
from .sample_sets import SampleSetError, check_sample_set

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
    """All metrics of a sample folder against the reference statistics, plus `extra` provenance.

    The set is checked first (`check_sample_set`: every image its sampling.json names, no other) and every image
    must decode. A bad set is never scored: it is moved aside (`<set>.stale-<time>`, kept for inspection) and a
    `SampleSetError` says so, so that running Snakemake again regenerates the set (its shards are temporary)."""
    try:
        paths = check_sample_set(samples_dir)
        features = metrics.extract_features(network, paths, batch_size=batch_size, description="sample features")
    except (SampleSetError, metrics.UnreadableImageError) as error:
        aside = set_aside(samples_dir, "is not the sample set its sampling.json describes")
        raise SampleSetError(f"{error}. Not scored: the set was moved to {aside}; run snakemake again and its "
                             f"sampling rules regenerate it") from error
    # Precision / recall compares every sample with every reference image (50k x 50k at 2048-d): on
    # the feature network's device, the GPU where there is one.
    reference = metrics.load_statistics(reference_npz)
    result = metrics.compute_metrics(features, reference, device=network.device)
    log.info("scored %d samples of %s against %s (%d reference images, %s): FID %.3f, sFID %.3f",
             len(paths), samples_dir, reference_npz, reference["num_images"], network.name, result["fid"],
             result["sfid"])
    sessions = Path(samples_dir) / "provenance.json"
    return {**result, "num_reference_skipped": len(reference.get("skipped", [])), **extra,
            "provenance": {"metrics": provenance(network.device, batch_size=batch_size),
                           "samples": json.loads(sessions.read_text()) if sessions.exists() else [],
                           "reference": reference["provenance"]}}
