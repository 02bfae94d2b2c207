"""SD-1.5's architecture as urepa.sd15 writes it out: the full-size configs build the real shapes."""
import torch

from urepa.sd15 import SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG


def test_full_size_configs_give_the_real_shapes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG))
        latents = vae.encode(torch.zeros(1, 3, 512, 512)).latent_dist.mean
        hidden = text(torch.zeros(1, 77, dtype=torch.long)).last_hidden_state
    assert latents.shape == (1, 4, 64, 64)
    assert hidden.shape == (1, 77, 768)
    assert unet.mid_block.resnets[-1].out_channels == 1280
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964  # stable-diffusion-v1-5's U-Net
