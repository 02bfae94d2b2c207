"""Loading Stable Diffusion 1.5 components from a local diffusers folder (real weights or the smoke
tier's tiny ones: the same calls). Nothing is ever fetched from a hub."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import SD15_SUBFOLDERS

# unet/config.json of stable-diffusion-v1-5: builds the real-shape U-Net (random or on the meta
# device) for tests and benchmarks where the weights are not on disk.
SD15_UNET_CONFIG = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
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
    from diffusers import AutoencoderKL

    root = check_sd15_dir(sd15_dir, ("vae",))
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", dtype=dtype, local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


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
