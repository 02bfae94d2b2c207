"""The VAE of the latents as a setting: `vae: sd15` (SD-1.5's own `vae/`) or the name of an entry under `vaes:`,
a local diffusers `AutoencoderKL` folder (e.g. REPA-E's end-to-end tuned SD-VAE). Checking such a folder, loading
it, its record in caches and exported weights, and its latent normalisation, read from its config and applied the
same way by training (`normalise`), sampling and the analyses (`denormalise`, `normalise`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .digests import weights_fingerprint

SD15_VAE = "sd15"
# SD-1.5's U-Net reads 4-channel latents at 1/8 of the image side: any VAE it is trained on must make those.
UNET_LATENT_CHANNELS = 4
UNET_DOWNSAMPLING = 8
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


class VaeMismatchError(RuntimeError):
    """Latents or weights of one VAE met another VAE."""


def vae_dir(name: str, sd15_dir: str | Path, vaes: dict) -> Path:
    """The AutoencoderKL folder of VAE `name`: `sd15_dir/vae` for `sd15`, else `vaes[name]`."""
    if name == SD15_VAE:
        return Path(sd15_dir) / "vae"
    if name not in vaes:
        raise KeyError(f"vae {name!r} is neither {SD15_VAE!r} nor a name under `vaes:` ({', '.join(vaes) or 'none'})")
    return Path(vaes[name])


def check_vae_dir(path: str | Path, key: str) -> Path:
    """Fail, naming the config `key`, unless `path` is a diffusers AutoencoderKL folder whose latents SD-1.5's
    U-Net can read (4 channels at 1/8 of the image side)."""
    root = Path(path)
    config_file = root / "config.json"
    if not root.is_dir():
        raise FileNotFoundError(f"{key}: VAE folder {root} does not exist (expected a diffusers AutoencoderKL "
                                f"folder: config.json and {WEIGHT_FILES[0]})")
    if not config_file.is_file() or not any((root / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"{key}: {root} is not a diffusers AutoencoderKL folder (it needs config.json and "
                                f"{WEIGHT_FILES[0]}; save one with AutoencoderKL.save_pretrained)")
    config = json.loads(config_file.read_text())
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{key}: {root} holds a {config['_class_name']}, not an AutoencoderKL")
    channels = config.get("latent_channels", 4)
    downsampling = 2 ** (len(config.get("block_out_channels", [64])) - 1)
    if (channels, downsampling) != (UNET_LATENT_CHANNELS, UNET_DOWNSAMPLING):
        raise ValueError(f"{key}: the VAE in {root} makes {channels}-channel latents at 1/{downsampling} of the "
                         f"image side; SD-1.5's U-Net reads {UNET_LATENT_CHANNELS} channels at "
                         f"1/{UNET_DOWNSAMPLING}")
    return root


def load_autoencoder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A frozen AutoencoderKL from a local folder (nothing is fetched)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(path), dtype=dtype, local_files_only=True)
    return vae.to(device).eval().requires_grad_(False)


def vae_record(name: str, path: str | Path) -> dict:
    """What a cache and an exported weights folder record of their VAE: name, folder and weights fingerprint (the
    fingerprint covers config.json in full, so the latent normalisation too)."""
    return {"name": name, "path": str(path), "fingerprint": weights_fingerprint(path)}


def check_same_vae(expected: dict, found: dict, what: str) -> None:
    """Refuse `found` (a VAE record) where `expected` is required, naming both."""
    if expected["fingerprint"] != found["fingerprint"]:
        raise VaeMismatchError(
            f"{what}: made with VAE {expected['name']!r} ({expected['path']}, fingerprint {expected['fingerprint']}) "
            f"but given VAE {found['name']!r} ({found['path']}, fingerprint {found['fingerprint']}). Latents of one "
            f"VAE decoded or trained with another give wrong images")


@dataclass(frozen=True)
class LatentNormalisation:
    """How a VAE's raw latents z become the latents the U-Net is trained on and samples, as diffusers' pipelines
    apply the config keys: z -> ((z - latents_mean) / latents_std - shift_factor) * scaling_factor, each
    step only where the key is set (SD-1.5's VAE has only scaling_factor 0.18215)."""

    scaling_factor: float
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, config) -> LatentNormalisation:
        def channels(key):
            return None if config.get(key) is None else tuple(float(v) for v in config[key])

        if (config.get("latents_mean") is None) != (config.get("latents_std") is None):
            raise ValueError("a VAE config with latents_mean needs latents_std, and the other way round")
        shift = config.get("shift_factor")
        return cls(float(config["scaling_factor"]), None if shift is None else float(shift),
                   channels("latents_mean"), channels("latents_std"))

    def _per_channel(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        if self.latents_mean is not None:
            z = (z - self._per_channel(self.latents_mean, z)) / self._per_channel(self.latents_std, z)
        if self.shift_factor is not None:
            z = z - self.shift_factor
        return z * self.scaling_factor

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        if self.latents_mean is not None:
            z = z * self._per_channel(self.latents_std, z) + self._per_channel(self.latents_mean, z)
        return z
