"""Loading Stable Diffusion 1.5 components from a local diffusers folder (real weights or the generated
ones of the smoke and rehearsal tiers: the same calls). Nothing is ever fetched from a hub."""
from __future__ import annotations

from pathlib import Path

import torch

# The folders of an SD-1.5 diffusers pipeline that the workflow loads.
SD15_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# The configs of stable-diffusion-v1-5's folders: they build the real architectures (random or on the
# meta device) for the rehearsal tier, tests and benchmarks, where the weights are not on disk.
# unet/config.json:
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
# vae/config.json: 512 px images <-> 4 x 64 x 64 latents.
SD15_VAE_CONFIG = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}
# text_encoder/config.json: CLIP ViT-L/14's text tower, 77 x 768 hidden states. The token ids are the
# tokenizer's own (the generated inputs use a smaller one; its ids fit this vocabulary).
SD15_TEXT_ENCODER_CONFIG = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05,
    "projection_dim": 768,
}
# scheduler/scheduler_config.json: the PNDM configuration SD-1.5 ships; DDPM and the samplers read the
# same beta schedule from it, and `clip_sample: false` (DDIM's default would clip x0 to [-1, 1], which is
# wrong for latents). Build it with `PNDMScheduler.from_config`, which keeps that key.
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
    "clip_sample": False,
}


def check_sd15_dir(sd15_dir: str | Path, subfolders: tuple[str, ...] = SD15_SUBFOLDERS) -> Path:
    """Fail at once, saying what is missing, unless `sd15_dir` is a diffusers SD-1.5 folder."""
    root = Path(sd15_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"SD-1.5 folder {root} does not exist (expected a diffusers folder with "
                                f"{', '.join(s + '/' for s in SD15_SUBFOLDERS)})")
    missing = [s for s in subfolders if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"SD-1.5 folder {root} lacks {', '.join(s + '/' for s in missing)} "
                                f"(expected the diffusers layout of stable-diffusion-v1-5)")
    return root


def load_vae(sd15_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """SD-1.5's own VAE (`vae: sd15`), frozen."""
    from .vae import load_autoencoder

    return load_autoencoder(check_sd15_dir(sd15_dir, ("vae",)) / "vae", device, dtype)


def load_text_encoder(sd15_dir: str | Path, device: torch.device | str = "cpu"):
    """(tokenizer, CLIP text encoder), frozen."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = check_sd15_dir(sd15_dir, ("text_encoder", "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True)
    return tokenizer, text_encoder.to(device).eval().requires_grad_(False)


def load_unet(sd15_dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    from diffusers import UNet2DConditionModel

    root = check_sd15_dir(sd15_dir, ("unet",))
    return UNet2DConditionModel.from_pretrained(root, subfolder="unet", dtype=dtype,
                                                local_files_only=True).to(device)


def load_noise_scheduler(sd15_dir: str | Path):
    """The DDPM training schedule SD-1.5 was trained with (its scheduler/ config's betas)."""
    from diffusers import DDPMScheduler

    root = check_sd15_dir(sd15_dir, ("scheduler",))
    return DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
