"""Inputs the workflow generates for the tiers that cannot read real ones, in the real folder layouts so
that every stage runs the real-tier code path: an ILSVRC-layout image tree of procedurally drawn classes,
and randomly initialised models saved as the real ones are (an SD-1.5 diffusers folder, a transformers
DINOv2 folder, clean-fid's Inception TorchScript file).

- `smoke` tier: tiny models of SD-1.5's block structure and small images, end to end on a CPU in minutes.
- `rehearsal` tier (`full_size`): the real architectures (SD-1.5 U-Net / VAE / CLIP ViT-L/14 text encoder,
  DINOv2 ViT-L/14, Inception-v3) and images larger than 512 px, so that no stage of a real run meets a
  shape for the first time on the cluster. Only the tokenizer is small (see `tiny_clip_tokenizer`).
"""
from __future__ import annotations

import csv
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

# Real ImageNet synsets and names, so prompts and mapping files look like the real ones.
CLASSES = [
    ("n01440764", "tench, Tinca tinca"),
    ("n01443537", "goldfish, Carassius auratus"),
    ("n01484850", "great white shark, white shark, man-eater, Carcharodon carcharias"),
    ("n01491361", "tiger shark, Galeocerdo cuvieri"),
    ("n01494475", "hammerhead, hammerhead shark"),
    ("n01496331", "electric ray, crampfish, numbfish, torpedo"),
    ("n01498041", "stingray"),
    ("n01514668", "cock"),
]
SHAPES = ["ellipse", "rectangle", "triangle", "stripes", "cross", "ring", "checker", "diamond"]


SMOKE_SIDES = (144, 220)  # image sides drawn from [low, high): not square, cropped and resized by every stage


def draw_class_image(class_id: int, rng: np.random.Generator, sides: tuple[int, int] = SMOKE_SIDES) -> Image.Image:
    """One image of a class: the class fixes shape and hue, the rng varies size, place and noise."""
    width, height = (int(v) for v in rng.integers(*sides, size=2))
    hue = class_id / len(SHAPES)
    base = np.array(_hsv_to_rgb(hue, 0.8, 0.9)) * 255
    background = rng.normal(90, 25, size=(height, width, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(background).filter(ImageFilter.GaussianBlur(2))
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in (base + rng.normal(0, 12, 3)).clip(0, 255))
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    r = min(width, height) * rng.uniform(0.22, 0.38)
    box = [cx - r, cy - r, cx + r, cy + r]
    shape = SHAPES[class_id % len(SHAPES)]
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "stripes":
        for x in range(0, width, 16):
            draw.rectangle([x, 0, x + 7, height], fill=colour)
    elif shape == "cross":
        draw.rectangle([cx - r, cy - r / 4, cx + r, cy + r / 4], fill=colour)
        draw.rectangle([cx - r / 4, cy - r, cx + r / 4, cy + r], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=max(3, int(r / 3)))
    elif shape == "checker":
        step = max(8, int(r / 2))
        for i, x in enumerate(range(int(cx - r), int(cx + r), step)):
            for j, y in enumerate(range(int(cy - r), int(cy + r), step)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + step, y + step], fill=colour)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    return image


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys

    return colorsys.hsv_to_rgb(h, s, v)


def make_imagenet_tree(root: str | Path, classes: int, train_images: int, val_images: int, seed: int = 0,
                       image_sides: tuple[int, int] = SMOKE_SIDES) -> Path:
    """Write Data/CLS-LOC/{train/<synset>/,val/} JPEGs (`train_images` and `val_images` per class, sides
    drawn from `image_sides`), LOC_synset_mapping.txt and LOC_val_solution.csv. The arguments are a
    tier's `generated` keys."""
    if classes > len(CLASSES):
        raise ValueError(f"at most {len(CLASSES)} classes can be generated, asked for {classes}")
    root = Path(root)
    sides = tuple(image_sides)
    rng = np.random.default_rng(seed)
    train_dir, val_dir = root / "Data" / "CLS-LOC" / "train", root / "Data" / "CLS-LOC" / "val"
    val_dir.mkdir(parents=True, exist_ok=True)
    val_rows = []
    for class_id, (synset, _) in enumerate(CLASSES[:classes]):
        (train_dir / synset).mkdir(parents=True, exist_ok=True)
        for i in range(train_images):
            draw_class_image(class_id, rng, sides).save(train_dir / synset / f"{synset}_{i}.JPEG", quality=90)
        for i in range(val_images):
            image_id = f"ILSVRC2012_val_{class_id * val_images + i + 1:08d}"
            draw_class_image(class_id, rng, sides).save(val_dir / f"{image_id}.JPEG", quality=90)
            val_rows.append((image_id, f"{synset} 0 0 10 10"))
    with open(root / "LOC_synset_mapping.txt", "w") as f:
        f.writelines(f"{synset} {name}\n" for synset, name in CLASSES[:classes])
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(val_rows)
    log.info("generated an ILSVRC-layout tree of %d classes (%d train, %d validation JPEGs each, seed %d) in %s",
             classes, train_images, val_images, seed, root)
    return root


def tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with single-character tokens only (no merges): CLIP's real
    vocabulary file cannot be fetched here. Its 514 ids fit any text encoder's vocabulary, the real
    49408 included; prompts become one token per character, padded or cut to 77 like real ones."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab_tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab_tokens)}, merges=[], model_max_length=77)


def make_sd15(out_dir: str | Path, image_size: int, full_size: bool = False, seed: int = 0) -> Path:
    """A randomly initialised SD-1.5 pipeline saved with save_pretrained: unet/ vae/ text_encoder/ tokenizer/
    scheduler/ model_index.json, with SD-1.5's scheduler configuration.

    `full_size`: SD-1.5's own U-Net, VAE and CLIP ViT-L/14 text-encoder configs (512 px only). The U-Net's
    weight file is written in float16 (1.7 GB instead of 3.4 GB); loaders ask for float32 and get it.
    Otherwise SD-1.5's block structure at small widths for `image_size` px: three cross-attention down
    blocks and a plain one, a cross-attention mid block, mirrored up blocks."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .sd15 import SD15_SCHEDULER_CONFIG, SD15_TEXT_ENCODER_CONFIG, SD15_UNET_CONFIG, SD15_VAE_CONFIG

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = tiny_clip_tokenizer()
    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    if full_size:
        latent_size = SD15_UNET_CONFIG["sample_size"]
        if image_size != SD15_VAE_CONFIG["sample_size"]:
            raise ValueError(f"SD-1.5's architecture makes {SD15_VAE_CONFIG['sample_size']} px images "
                             f"({latent_size} x {latent_size} latents), not {image_size} px")
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER_CONFIG, **special_ids))
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG).half()
    else:
        text_dim = 32
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=text_dim, **special_ids,
        ))
        unet = UNet2DConditionModel(
            sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(32, 64, 64, 64),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=32,
        )
    vae = random_vae(image_size, full_size)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir)
    return out_dir


def random_vae(image_size: int, full_size: bool, scaling_factor: float = 0.18215):
    """A randomly initialised AutoencoderKL with SD-1.5's latents (4 channels, f8): SD-1.5's own config when
    `full_size`, else its block structure at small widths, one layer per block."""
    from diffusers import AutoencoderKL

    from .sd15 import SD15_VAE_CONFIG

    if full_size:
        return AutoencoderKL(**{**SD15_VAE_CONFIG, "scaling_factor": scaling_factor})
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), sample_size=image_size, scaling_factor=scaling_factor,
    )


# The generated stand-ins of the `vaes:` entries: SD-1.5's VAE architecture with other weights and a scaling factor
# of their own, so code that assumes SD's 0.18215 instead of reading the VAE's config is caught.
GENERATED_VAE_SCALING = 0.25


def make_vae(name: str, out_dir: str | Path, image_size: int, full_size: bool, seed: int = 0) -> Path:
    """The generated stand-in of VAE `name` (a `vaes:` entry) as a diffusers AutoencoderKL folder: weights drawn
    from a seed of its own (`seed` and the name), not SD-1.5's."""
    torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:vae:{name}".encode()).digest()[:4], "little"))
    random_vae(image_size, full_size, GENERATED_VAE_SCALING).save_pretrained(out_dir)
    return Path(out_dir)


def make_dinov2(out_dir: str | Path, full_size: bool = False, seed: int = 0) -> Path:
    """A randomly initialised DINOv2 (patch 14, trained size 518 like the released ones) saved as a
    transformers folder; at 224 px input it yields the real 16x16 token grid. `full_size`: ViT-L/14's
    config (1024-wide tokens); otherwise 64-wide, two layers."""
    from transformers import Dinov2Config, Dinov2Model

    from .dinov2 import DINOV2_VITL14_CONFIG

    torch.manual_seed(seed)
    config = DINOV2_VITL14_CONFIG if full_size else dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=14, image_size=518,
        layerscale_value=1.0)
    Dinov2Model(Dinov2Config(**config)).save_pretrained(out_dir)
    return Path(out_dir)


def make_inception(out_dir: str | Path, seed: int = 0) -> Path:
    """A folder holding a random Inception-v3 of the TF graph's structure as clean-fid's
    `inception-2015-12-05.pt`, loadable as `inception_dir`."""
    from .inception import save_random_inception
    from .feature_networks import INCEPTION_FILENAME

    save_random_inception(Path(out_dir) / INCEPTION_FILENAME, seed)
    return Path(out_dir)


def make_model(name: str, out_dir: str | Path, image_size: int, full_size: bool, seed: int = 0) -> Path:
    """One generated input folder by name: "sd15", "dinov2" or "inception" (always full size)."""
    makers = {"sd15": lambda: make_sd15(out_dir, image_size, full_size, seed),
              "dinov2": lambda: make_dinov2(out_dir, full_size, seed),
              "inception": lambda: make_inception(out_dir, seed)}
    if name not in makers:
        raise ValueError(f"no generated model called {name!r}: expected sd15, dinov2 or inception")
    folder = makers[name]()
    log.info("generated %s with random weights (seed %d, %s shapes) in %s", name, seed,
             "the real" if full_size or name == "inception" else "tiny", folder)
    return folder
