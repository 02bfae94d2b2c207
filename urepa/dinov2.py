"""Frozen DINOv2 encoder: the alignment targets of U-REPA.

Loads either a transformers DINOv2 folder or an original facebookresearch checkpoint
(`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`), converted into the matching transformers model,
and returns the final-layernorm patch tokens, L2-normalised per token.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
)

# Every released DINOv2 has 64-dimensional heads; the checkpoint itself does not record the head count.
HEAD_DIM = 64

MODEL_CLASSES = {"dinov2": Dinov2Model, "dinov2_with_registers": Dinov2WithRegistersModel}
# config.json of facebook/dinov2-large (ViT-L/14, trained at 518 px): 16 x 16 tokens of 1024 at 224 px.
# Builds the real architecture with random weights for the rehearsal tier.
DINOV2_VITL14_CONFIG = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "mlp_ratio": 4, "patch_size": 14,
    "image_size": 518, "layerscale_value": 1.0, "layer_norm_eps": 1e-6, "hidden_act": "gelu", "qkv_bias": True,
    "use_swiglu_ffn": False,
}


def expected_what(path: str | Path) -> str:
    return (f"expected a transformers DINOv2 folder with config.json or an original dinov2_vit*14*.pth "
            f"checkpoint at {path}")


class DinoV2Encoder(nn.Module):
    """A frozen DINOv2 that maps normalised images [B, 3, H, W] to unit-norm patch tokens [B, T, D]."""

    def __init__(self, model: Dinov2Model | Dinov2WithRegistersModel, name: str) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.dim = int(model.config.hidden_size)
        self.patch_size = int(model.config.patch_size)
        self.num_register_tokens = int(getattr(model.config, "num_register_tokens", 0))

    def train(self, mode: bool = True) -> "DinoV2Encoder":
        # A parent's .train() must not switch the frozen target encoder out of eval mode.
        return super().train(False)

    def grid(self, image_size: int) -> int:
        return image_size // self.patch_size

    def metadata(self, image_size: int) -> dict:
        """What a token cache must record to be checked against the encoder at training time."""
        return {"encoder": self.name, "dim": self.dim, "patch_size": self.patch_size,
                "num_register_tokens": self.num_register_tokens, "image_size": image_size,
                "grid": self.grid(image_size)}

    # no_grad rather than inference_mode: inference tensors cannot be saved for backward, so they would
    # break a loss that uses the tokens as targets next to a U-Net prediction that needs gradients.
    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Final-layernorm patch tokens (CLS and registers dropped), L2-normalised, float32 [B, grid², D]."""
        weight = self.model.embeddings.patch_embeddings.projection.weight
        hidden = self.model(pixel_values=pixel_values.to(device=weight.device, dtype=weight.dtype)).last_hidden_state
        patch_tokens = hidden[:, 1 + self.num_register_tokens:]
        return F.normalize(patch_tokens.float(), dim=-1)


def load_dinov2(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> DinoV2Encoder:
    """Load a frozen DINOv2 from a transformers folder or an original facebookresearch .pth checkpoint."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{expected_what(path)}: the folder has no config.json")
        model, name = load_transformers_folder(path, dtype), path.resolve().name
    elif path.is_file():
        model, name = load_original_checkpoint(path), path.stem
    else:
        raise FileNotFoundError(f"{expected_what(path)}: nothing exists there")
    return DinoV2Encoder(model.to(device=device, dtype=dtype), name)


def load_transformers_folder(path: Path, dtype: torch.dtype) -> Dinov2Model | Dinov2WithRegistersModel:
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{expected_what(path)}: config.json has model_type {model_type!r}, "
                         f"not one of {sorted(MODEL_CLASSES)}")
    model, loading_info = MODEL_CLASSES[model_type].from_pretrained(
        path, local_files_only=True, dtype=dtype, output_loading_info=True)
    # transformers only warns and initialises missing weights at random: a silently random target encoder.
    if loading_info["missing_keys"]:
        raise ValueError(f"DINOv2 folder {path} lacks weights for {sorted(loading_info['missing_keys'])}")
    return model


def load_original_checkpoint(path: Path) -> Dinov2Model | Dinov2WithRegistersModel:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{expected_what(path)}: the file is not a torch checkpoint ({error})") from error
    if not (isinstance(state_dict, dict) and {"pos_embed", "cls_token", "patch_embed.proj.weight"} <= state_dict.keys()
            and all(isinstance(value, torch.Tensor) for value in state_dict.values())):
        found = ([str(key) for key in list(state_dict)[:8]] if isinstance(state_dict, dict)
                 else type(state_dict).__name__)
        raise ValueError(f"{expected_what(path)}: the file is not a plain DINOv2 state dict with pos_embed, "
                         f"cls_token and patch_embed.proj.weight (found {found})")
    state_dict = flatten_block_chunks(state_dict, path)
    config = config_from_checkpoint(state_dict, path)
    check_checkpoint_keys(state_dict, config, path)
    model_class = Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else Dinov2Model
    # Built on the meta device, then the checkpoint tensors are assigned: no throw-away random init.
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict(to_transformers_state_dict(state_dict, config), strict=True, assign=True)
    return model


def flatten_block_chunks(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """`blocks.{chunk}.{i}.*` (block_chunks > 0, FSDP training layout) -> `blocks.{i}.*`; the original
    pads each chunk with Identity modules, so `i` is already the global block index."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        flat_key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        if flat_key in flat:
            raise ValueError(f"DINOv2 checkpoint {path}: block key {flat_key} appears in more than one chunk")
        flat[flat_key] = value
    return flat


def config_from_checkpoint(state_dict: dict[str, torch.Tensor], path: Path) -> Dinov2Config:
    """The transformers config of the architecture the original checkpoint's tensors describe."""
    hidden_size, num_channels, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    if hidden_size % HEAD_DIM:
        raise ValueError(f"DINOv2 checkpoint {path}: hidden size {hidden_size} is not a multiple of the "
                         f"head dimension {HEAD_DIM}")
    num_positions = state_dict["pos_embed"].shape[1] - 1
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise ValueError(f"DINOv2 checkpoint {path}: pos_embed has {num_positions} patch positions, not a square grid")
    block_indices = {int(match.group(1)) for key in state_dict if (match := re.match(r"blocks\.(\d+)\.", key))}
    if not block_indices:
        raise ValueError(f"DINOv2 checkpoint {path}: no blocks.* keys")
    use_swiglu_ffn = any(re.fullmatch(r"blocks\.\d+\.mlp\.w12\.weight", key) for key in state_dict)
    common = dict(
        hidden_size=int(hidden_size), num_hidden_layers=max(block_indices) + 1,
        num_attention_heads=int(hidden_size) // HEAD_DIM, mlp_ratio=mlp_ratio(state_dict, int(hidden_size), path),
        image_size=grid * int(patch_size), patch_size=int(patch_size), num_channels=int(num_channels),
        use_swiglu_ffn=use_swiglu_ffn, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
    )
    if "register_tokens" in state_dict:
        return Dinov2WithRegistersConfig(num_register_tokens=state_dict["register_tokens"].shape[1], **common)
    return Dinov2Config(**common)


def mlp_ratio(state_dict: dict[str, torch.Tensor], hidden_size: int, path: Path) -> int:
    """The integer MLP ratio that reproduces block 0's MLP width (transformers' config takes no width)."""
    if "blocks.0.mlp.w12.weight" in state_dict:
        swiglu_width = state_dict["blocks.0.mlp.w12.weight"].shape[0] // 2
        # SwiGLU keeps 2/3 of hidden * ratio, rounded up to a multiple of 8 (as in DINOv2 and transformers)
        ratio = next((ratio for ratio in range(1, 17)
                      if (int(hidden_size * ratio * 2 / 3) + 7) // 8 * 8 == swiglu_width), None)
        width = swiglu_width
    elif "blocks.0.mlp.fc1.weight" in state_dict:
        width = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
        ratio = width // hidden_size if width % hidden_size == 0 else None
    else:
        raise ValueError(f"DINOv2 checkpoint {path}: block 0 has neither mlp.fc1 nor mlp.w12 weights")
    if ratio is None:
        raise ValueError(f"DINOv2 checkpoint {path}: MLP width {width} matches no integer MLP ratio of "
                         f"hidden size {hidden_size}")
    return ratio


def original_keys(config: Dinov2Config) -> set[str]:
    """Every key an original DINOv2 checkpoint of this architecture holds."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    if getattr(config, "num_register_tokens", 0):
        keys.add("register_tokens")
    mlp_layers = ("w12", "w3") if config.use_swiglu_ffn else ("fc1", "fc2")
    for index in range(config.num_hidden_layers):
        for module in ("norm1", "attn.qkv", "attn.proj", "norm2", *(f"mlp.{layer}" for layer in mlp_layers)):
            keys |= {f"blocks.{index}.{module}.weight", f"blocks.{index}.{module}.bias"}
        keys |= {f"blocks.{index}.ls1.gamma", f"blocks.{index}.ls2.gamma"}
    return keys


def check_checkpoint_keys(state_dict: dict[str, torch.Tensor], config: Dinov2Config, path: Path) -> None:
    expected = original_keys(config)
    missing, unused = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    if missing or unused:
        raise ValueError(f"DINOv2 checkpoint {path} does not match the architecture its tensors describe "
                         f"({config.num_hidden_layers} blocks, hidden {config.hidden_size}): "
                         f"missing keys {missing}, unused keys {unused}")


def to_transformers_state_dict(state_dict: dict[str, torch.Tensor], config: Dinov2Config) -> dict[str, torch.Tensor]:
    """Rename original DINOv2 keys to transformers' and split the fused qkv and SwiGLU w12 projections."""
    converted = {
        "embeddings.cls_token": state_dict["cls_token"],
        "embeddings.position_embeddings": state_dict["pos_embed"],
        "embeddings.mask_token": state_dict["mask_token"].reshape(1, config.hidden_size),
        "embeddings.patch_embeddings.projection.weight": state_dict["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state_dict["patch_embed.proj.bias"],
        "layernorm.weight": state_dict["norm.weight"],
        "layernorm.bias": state_dict["norm.bias"],
    }
    if "register_tokens" in state_dict:
        converted["embeddings.register_tokens"] = state_dict["register_tokens"]
    renamed = {"norm1": "norm1", "attn.proj": "attention.o_proj", "norm2": "norm2"}
    split = {"attn.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj")}
    if config.use_swiglu_ffn:
        renamed["mlp.w3"] = "mlp.down_proj"
        # DINOv2's SwiGLU computes silu(first half of w12) * second half: gate, then up.
        split["mlp.w12"] = ("mlp.gate_proj", "mlp.up_proj")
    else:
        renamed.update({"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
    for index in range(config.num_hidden_layers):
        source, target = f"blocks.{index}", f"encoder.layer.{index}"
        for parameter in ("weight", "bias"):
            for old, new in renamed.items():
                converted[f"{target}.{new}.{parameter}"] = state_dict[f"{source}.{old}.{parameter}"]
            for old, parts in split.items():
                for new, chunk in zip(parts, state_dict[f"{source}.{old}.{parameter}"].chunk(len(parts), dim=0)):
                    converted[f"{target}.{new}.{parameter}"] = chunk.contiguous()
        converted[f"{target}.layer_scale1.lambda1"] = state_dict[f"{source}.ls1.gamma"]
        converted[f"{target}.layer_scale2.lambda1"] = state_dict[f"{source}.ls2.gamma"]
    return converted
