"""The embedded `smoke` tier: a generated ILSVRC-layout image tree and tiny random models saved in
the real SD-1.5 / DINOv2 folder layouts, so that every stage runs the real-tier code path on a CPU."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

# Real ImageNet synsets and names, so prompts and mapping files look like the real ones.
SMOKE_CLASSES = [
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


def draw_class_image(class_id: int, rng: np.random.Generator) -> Image.Image:
    """One image of a class: the class fixes shape and hue, the rng varies size, place and noise."""
    width, height = (int(v) for v in rng.integers(144, 220, size=2))
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


def make_imagenet_tree(root: str | Path, num_classes: int, train_per_class: int, val_per_class: int,
                       seed: int = 0) -> Path:
    """Write Data/CLS-LOC/{train/<synset>/,val/} JPEGs, LOC_synset_mapping.txt and LOC_val_solution.csv."""
    if num_classes > len(SMOKE_CLASSES):
        raise ValueError(f"the smoke tier has at most {len(SMOKE_CLASSES)} classes, asked for {num_classes}")
    root = Path(root)
    classes = SMOKE_CLASSES[:num_classes]
    rng = np.random.default_rng(seed)
    train_dir, val_dir = root / "Data" / "CLS-LOC" / "train", root / "Data" / "CLS-LOC" / "val"
    val_dir.mkdir(parents=True, exist_ok=True)
    val_rows = []
    for class_id, (synset, _) in enumerate(classes):
        (train_dir / synset).mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            draw_class_image(class_id, rng).save(train_dir / synset / f"{synset}_{i}.JPEG", quality=90)
        for i in range(val_per_class):
            image_id = f"ILSVRC2012_val_{class_id * val_per_class + i + 1:08d}"
            draw_class_image(class_id, rng).save(val_dir / f"{image_id}.JPEG", quality=90)
            val_rows.append((image_id, f"{synset} 0 0 10 10"))
    with open(root / "LOC_synset_mapping.txt", "w") as f:
        f.writelines(f"{synset} {name}\n" for synset, name in classes)
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        writer.writerows(val_rows)
    return root


def _tiny_clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with single-character tokens only (no merges)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab_tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab_tokens)}, merges=[], model_max_length=77)


def make_tiny_sd15(out_dir: str | Path, image_size: int, seed: int = 0) -> Path:
    """A randomly initialised SD-1.5-shaped pipeline (same block types, cross-attention, scheduler) saved
    with save_pretrained: unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _tiny_clip_tokenizer()
    text_dim = 32
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=text_dim,
    ))
    # SD-1.5's block structure at small widths: three cross-attention down blocks and a plain one,
    # a cross-attention mid block, mirrored up blocks, two layers per block.
    unet = UNet2DConditionModel(
        sample_size=image_size // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_dim, attention_head_dim=8, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64), sample_size=image_size, scaling_factor=0.18215,
    )
    # SD-1.5 ships this PNDM configuration; DDPM and the samplers read the same beta schedule from it.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(out_dir)
    return out_dir


def make_tiny_dinov2(out_dir: str | Path, seed: int = 0) -> Path:
    """A randomly initialised DINOv2 (patch 14, trained size 518 like the released ones) saved as a
    transformers folder; at 224 px input it yields the real 16x16 token grid."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, patch_size=14,
        image_size=518, layerscale_value=1.0,
    ))
    model.save_pretrained(out_dir)
    return Path(out_dir)
