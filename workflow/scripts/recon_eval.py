"""Stage 5: a VAE's reconstruction metrics on the tier's validation subset (PSNR, SSIM, LPIPS, rFID)."""
import json
from pathlib import Path

from urepa.feature_networks import build_feature_network
from urepa.reconstruction import load_lpips, reconstruction_metrics
from urepa.runtime import resolve_device, set_threads, setup_logging
from urepa.vae import load_autoencoder

setup_logging(snakemake.log[0])
set_threads(snakemake.threads)
params, resources = snakemake.params, snakemake.resources
device = resolve_device(resources.device, resources.gpu)
inception, vgg16 = snakemake.input.inception, snakemake.input.vgg16  # [] for the stand-ins of generated tiers
network = build_feature_network(params.network, inception[0] if inception else None, device)
lpips_model, lpips_name = load_lpips(vgg16[0] if vgg16 else None, device, seed=params.lpips_seed)
vae = load_autoencoder(Path(snakemake.input.vae_model) / params.vae_subfolder, device)
result = reconstruction_metrics(snakemake.input.csv, params.image_size, vae, network, lpips_model, params.batch_size,
                                resources.data_workers, device, lpips_name=lpips_name,
                                images_per_class=params.images_per_class)
Path(snakemake.output[0]).write_text(json.dumps({"vae": snakemake.wildcards.vae, **result}, indent=2))
