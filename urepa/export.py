"""The exported model folder: what training writes (the trainable weights in diffusers form, the scheduler config
they were trained for, the align heads, and `weights.json`, which describes the folder: fine-tune mode, aligned
layers, prediction type, the VAE the latents came from) and what sampling and the analyses read back from it.
Every reader takes what it needs from the folder itself, never from the training settings."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from .digests import weights_fingerprint
from .runtime import disk_full_named
from .vae import check_same_vae, load_autoencoder, vae_record

log = logging.getLogger(__name__)

# `train.prediction` -> diffusers' `prediction_type`.
PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction"}
DESCRIPTION = "weights.json"
# A snapshot's partial or full fine-tune: the U-Net's trained parameters only, by their state-dict names, to be put
# into the base U-Net that weights.json's `base_unet` records (a partial snapshot is 1.3 GB instead of 3.4 GB).
TRAINED_UNET = "unet_trained_parameters.safetensors"
# weights.json's fine-tune mode of a folder that describes SD-1.5 as it is (`save_pretrained_description`): no
# weights of its own, the base U-Net used unchanged.
PRETRAINED_MODE = "none"


class BaseUnetMismatchError(ValueError):
    """Weights that apply to one base U-Net were to be put into another."""


def base_unet_record(sd15_dir: str | Path) -> dict:
    """The U-Net a run starts from, as weights folders record it: SD-1.5's unet/ folder and its fingerprint."""
    unet_dir = Path(sd15_dir) / "unet"
    return {"path": str(unet_dir), "fingerprint": weights_fingerprint(unet_dir)}


def save_weights(out_dir: str | Path, model, noise_scheduler, settings: dict, token_dim: int, vae: dict,
                 base_unet: dict | None = None, trained_only: bool = False) -> None:
    """`model`'s (an unwrapped urepa.models.AlignedUNet) current trainable weights in diffusers form (LoRA:
    pytorch_lora_weights.safetensors, loadable by StableDiffusionPipeline.load_lora_weights; otherwise a unet/
    folder, or with `trained_only` (snapshots) the trained parameters alone, TRAINED_UNET), the scheduler config
    they were trained for (scheduler/, with its prediction_type), the heads, and the folder's description (`vae`:
    name, path and fingerprint of the VAE the training latents came from; `base_unet`, `base_unet_record`: the
    U-Net the run started from, which LoRA and TRAINED_UNET apply to; required with `trained_only`)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if trained_only and base_unet is None:
        raise ValueError("trained_only weights need base_unet: the U-Net they are to be put into")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with disk_full_named(out_dir):
        if settings["finetune"] == "lora":
            # Keys stay in peft's lora_A / lora_B form. convert_state_dict_to_diffusers renames only the
            # attention keys (lora.down / lora.up), and load_lora_weights judges the format by the first
            # key alone: a conv key first (lora_A) made it silently drop every attention LoRA.
            lora = get_peft_model_state_dict(model.unet)
            StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=lora, safe_serialization=True)
        elif trained_only:
            save_file({name: p.detach().cpu().contiguous() for name, p in model.unet.named_parameters()
                       if p.requires_grad}, out_dir / TRAINED_UNET)
        else:
            model.unet.save_pretrained(out_dir / "unet")
        trained_scheduler(noise_scheduler, settings["prediction"]).save_pretrained(out_dir / "scheduler")
        if model.heads:
            save_file({k: v.detach().float().cpu().contiguous() for k, v in model.heads.state_dict().items()},
                      out_dir / "align_heads.safetensors")
            first = next(iter(model.heads.values()))
            (out_dir / "align_heads.json").write_text(json.dumps({
                "layers": list(model.heads), "grid": first.grid, "projector": settings["projector"],
                "projector_hidden": settings["projector_hidden"],
                "target_spatial_norm": settings["target_spatial_norm"],  # what the analyses score the heads against
                "dim": token_dim,
            }, indent=2))
        (out_dir / DESCRIPTION).write_text(json.dumps({
            "finetune": settings["finetune"], "prediction": settings["prediction"],
            "align_layers": settings["align_layers"], "align_coeff": settings["align_coeff"], "vae": vae,
            **({"base_unet": base_unet} if base_unet else {})}, indent=2))


def save_pretrained_description(out_dir: str | Path, sd15_dir: str | Path, vae: dict) -> None:
    """A weights folder for SD-1.5 as it is, so it is sampled and scored as every fine-tuned folder is: no U-Net
    weights (never a copy of the base U-Net), SD-1.5's own training scheduler (scheduler/, its prediction type),
    and weights.json in fine-tune mode `PRETRAINED_MODE`, no align layers, `vae` (the record of SD-1.5's VAE) and the
    base U-Net it stands for (`base_unet_record`), so it is never sampled with another SD-1.5 folder."""
    from .sd15 import load_noise_scheduler

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scheduler = load_noise_scheduler(sd15_dir)
    scheduler.save_pretrained(out_dir / "scheduler")
    prediction = {v: k for k, v in PREDICTION_TYPES.items()}[scheduler.config.prediction_type]
    (out_dir / DESCRIPTION).write_text(json.dumps({
        "finetune": PRETRAINED_MODE, "prediction": prediction, "align_layers": [], "align_coeff": 0.0, "vae": vae,
        "base_unet": base_unet_record(sd15_dir)}, indent=2))


def read_description(weights_dir: str | Path) -> dict:
    """A weights folder's `weights.json`; a folder exported before it existed is refused with what to do."""
    path = Path(weights_dir) / DESCRIPTION
    if not path.is_file():
        raise FileNotFoundError(f"{weights_dir} has no {DESCRIPTION}: the weights do not say how they were trained "
                                f"(fine-tune mode, aligned layers, VAE); re-export them with this version")
    return json.loads(path.read_text())


def is_pretrained(weights_dir: str | Path) -> bool:
    """Whether a weights folder describes SD-1.5 as it is (`save_pretrained_description`), not fine-tuned weights."""
    return read_description(weights_dir)["finetune"] == PRETRAINED_MODE


def trained_scheduler(noise_scheduler, prediction: str):
    """SD-1.5's training schedule with the parameterisation this run trained: what a sampler must use.
    A stock pipeline with SD-1.5's own scheduler would read a `v` model's output as epsilon."""
    return type(noise_scheduler).from_config(noise_scheduler.config, prediction_type=PREDICTION_TYPES[prediction])


def inference_dtype(device: torch.device) -> torch.dtype:
    """float16 on CUDA, as SD-1.5 is usually run (a 50k-image FID set at 250 steps is hours of GPU
    time, roughly twice that in float32); float32 on the CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_finetuned_pipeline(sd15_dir: str | Path, weights_dir: str | Path, device: torch.device,
                            dtype: torch.dtype | None = None, vae_dir: str | Path | None = None,
                            vae_name: str | None = None, allow_other_vae: bool = False):
    """SD-1.5 from its local folder with the fine-tuned weights in, as the folder describes them: LoRA through
    `load_lora_weights` (then fused), the saved unet/ folder for partial / full fine-tuning, a snapshot's
    trained parameters (TRAINED_UNET) put into SD-1.5's U-Net, or none for a `PRETRAINED_MODE` folder (SD-1.5's U-Net
    as it is); LoRA, trained parameters and the pretrained folder only with the base
    U-Net they were trained from (or stand for) (weights.json's `base_unet`, where recorded), refusing another with
    `BaseUnetMismatchError`; the scheduler config the weights were trained for (their scheduler/ folder: the
    prediction type); and, as `pipe.vae`, the VAE
    whose latents they were trained on: `vae_dir` (default: the folder weights.json records), refused with
    `VaeMismatchError` when it is another VAE unless `allow_other_vae` (then only warned).
    `dtype`: default `inference_dtype(device)`."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from .sd15 import check_sd15_dir

    dtype = dtype or inference_dtype(device)
    weights_dir = Path(weights_dir)
    description = read_description(weights_dir)
    trained_vae = description["vae"]
    decode_vae = vae_record(vae_name or trained_vae["name"], vae_dir or trained_vae["path"])
    if not allow_other_vae:
        check_same_vae(trained_vae, decode_vae, f"weights {weights_dir}")
    elif decode_vae["fingerprint"] != trained_vae["fingerprint"]:
        log.warning("decoding weights %s, trained on the latents of VAE %r, with VAE %r (%s), as configured",
                    weights_dir, trained_vae["name"], decode_vae["name"], decode_vae["path"])
    trained_only = (weights_dir / TRAINED_UNET).is_file()
    pretrained = description["finetune"] == PRETRAINED_MODE
    if trained_only or pretrained or description["finetune"] == "lora":
        check_same_base_unet(description, sd15_dir, weights_dir, required=trained_only or pretrained)
    pipe = StableDiffusionPipeline.from_pretrained(check_sd15_dir(sd15_dir), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   vae=load_autoencoder(decode_vae["path"], dtype=dtype),
                                                   dtype=dtype, local_files_only=True)
    if not (weights_dir / "scheduler").is_dir():
        raise FileNotFoundError(f"{weights_dir} has no scheduler/ folder: the weights do not say which "
                                f"parameterisation they were trained for; re-export them with this version")
    pipe.scheduler = DDPMScheduler.from_pretrained(weights_dir, subfolder="scheduler", local_files_only=True)
    if description["finetune"] == "lora":
        # The exported LoRA adapts the U-Net alone; load_lora_weights looks for text-encoder keys too and warns that
        # it found none. Expected: that one message of diffusers' LoRA loader, during this call, is left out.
        lora_loader_log = logging.getLogger("diffusers.loaders.lora_base")
        lora_loader_log.addFilter(_no_text_encoder_keys)
        try:
            pipe.load_lora_weights(weights_dir)
        finally:
            lora_loader_log.removeFilter(_no_text_encoder_keys)
        pipe.fuse_lora()
        pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    elif trained_only:
        load_trained_parameters(pipe.unet, weights_dir / TRAINED_UNET)
    elif not pretrained:
        pipe.unet = UNet2DConditionModel.from_pretrained(weights_dir / "unet", dtype=dtype, local_files_only=True)
    pipe.vae_record = decode_vae  # what sampling records of the VAE it decodes with
    return pipe.to(device)


def _no_text_encoder_keys(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No LoRA keys associated to CLIPTextModel")


def check_same_base_unet(description: dict, sd15_dir: str | Path, weights_dir: Path, required: bool) -> None:
    """Refuse to put weights into another U-Net than the base they were trained from (`description["base_unet"]`;
    a folder that does not record it passes unless it is `required`)."""
    recorded = description.get("base_unet")
    if recorded is None:
        if required:
            raise FileNotFoundError(f"{weights_dir / DESCRIPTION} does not record the base U-Net that "
                                    f"{TRAINED_UNET} applies to; re-export the weights with this version")
        return
    fingerprint = weights_fingerprint(Path(sd15_dir) / "unet")
    if fingerprint != recorded["fingerprint"]:
        raise BaseUnetMismatchError(
            f"weights {weights_dir} were trained from the U-Net in {recorded['path']} (fingerprint "
            f"{recorded['fingerprint']}), not from {Path(sd15_dir) / 'unet'} (fingerprint {fingerprint}): they hold "
            f"only what training changed, so sample them with the SD-1.5 folder they were trained from")


def load_trained_parameters(unet, path: Path) -> None:
    """Put TRAINED_UNET's parameters into `unet` (cast to its dtype), refusing names the U-Net does not have."""
    from safetensors.torch import load_file

    trained = load_file(path)
    unknown = trained.keys() - unet.state_dict().keys()
    if unknown:
        raise ValueError(f"{path} holds {len(unknown)} tensors the U-Net does not have (e.g. {sorted(unknown)[0]}): "
                         f"trained on another U-Net architecture")
    unet.load_state_dict(trained, strict=False)


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


def head_target_norm(weights_dir: str | Path) -> float | None:
    """alpha of the spatial normalisation (iREPA) of the DINOv2 tokens the align heads were trained towards; None
    for the tokens as cached, for a folder without heads, and for one exported before the setting existed."""
    path = Path(weights_dir) / "align_heads.json"
    return json.loads(path.read_text()).get("target_spatial_norm") if path.is_file() else None


def link_tree(source: Path, destination: Path) -> None:
    """Hard-link a folder tree (copy where links are impossible): snapshots exist once on disk."""
    for file in source.rglob("*"):
        if file.is_file():
            target = destination / file.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(file, target)
            except OSError:
                shutil.copy2(file, target)
