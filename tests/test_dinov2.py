"""urepa.dinov2 against an independent reference: a tiny random timm ViT configured like DINOv2,
written out in the original facebookresearch checkpoint layout; and the full-size config's shapes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Dinov2Config, Dinov2Model

from urepa.dinov2 import DINOV2_VITL14_CONFIG, DinoV2Encoder, load_dinov2

timm = pytest.importorskip("timm")
from timm.layers import SwiGLUPacked  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

HIDDEN = 128  # two 64-dimensional heads, so the q/k/v split across heads is exercised
NATIVE_SIZE = 56  # 4x4 grid of 14-pixel patches
EXPECTED_ERROR = ("expected a transformers DINOv2 folder with config.json or an original dinov2_vit*14*.pth "
                  "checkpoint at")
# variant: (register tokens, SwiGLU MLP as in ViT-g)
VARIANTS = {"plain": (0, False), "reg4": (4, False), "swiglu_reg4": (4, True)}


def timm_dinov2(registers: int, swiglu: bool, seed: int = 0) -> VisionTransformer:
    """timm's vit_*_patch14_dinov2 / _reg4 model arguments at toy size, every weight randomised
    (layer scale included, so no block is a near-identity)."""
    torch.manual_seed(seed)
    mlp_args = {}
    if swiglu:
        swiglu_width = (int(HIDDEN * 4 * 2 / 3) + 7) // 8 * 8  # DINOv2's SwiGLU width at mlp ratio 4
        mlp_args = dict(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, mlp_ratio=2 * swiglu_width / HIDDEN)
    model = VisionTransformer(
        img_size=NATIVE_SIZE, patch_size=14, embed_dim=HIDDEN, depth=2, num_heads=HIDDEN // 64, init_values=1e-5,
        num_classes=0, reg_tokens=registers, no_embed_class=registers > 0, dynamic_img_size=True, **mlp_args,
    ).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".gamma"):
                parameter.copy_(torch.randn_like(parameter) * 0.5)
            elif "norm" in name and name.endswith(".weight"):
                parameter.copy_(1 + torch.randn_like(parameter) * 0.1)
            else:
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    return model


def original_state_dict(model: VisionTransformer, swiglu: bool) -> dict[str, torch.Tensor]:
    """timm's DINOv2 conversion run backwards: the facebookresearch key layout."""
    state_dict = {key: value.clone() for key, value in model.state_dict().items()}
    if swiglu:
        state_dict = {key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): value
                      for key, value in state_dict.items()}
    if "reg_token" in state_dict:
        # timm folds the CLS position into cls_token; the original adds pos_embed[:, 0] to it.
        state_dict["register_tokens"] = state_dict.pop("reg_token")
        class_position = torch.randn(1, 1, HIDDEN) * 0.1
        state_dict["pos_embed"] = torch.cat([class_position, state_dict["pos_embed"]], dim=1)
        state_dict["cls_token"] = state_dict["cls_token"] - class_position
    state_dict["mask_token"] = torch.zeros(1, HIDDEN)
    return state_dict


def reference_tokens(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(model.forward_features(images)[:, model.num_prefix_tokens:], dim=-1)


def write_checkpoint(tmp_path: Path, variant: str) -> tuple[VisionTransformer, Path]:
    registers, swiglu = VARIANTS[variant]
    model = timm_dinov2(registers, swiglu)
    path = tmp_path / f"dinov2_vitt14{'_reg4' if registers else ''}_pretrain.pth"
    torch.save(original_state_dict(model, swiglu), path)
    return model, path


@pytest.mark.parametrize("variant", VARIANTS)
def test_original_checkpoint_matches_timm(tmp_path: Path, variant: str) -> None:
    reference, path = write_checkpoint(tmp_path, variant)
    encoder = load_dinov2(str(path), device="cpu", dtype=torch.float32)
    assert isinstance(encoder, DinoV2Encoder)
    images = torch.randn(2, 3, NATIVE_SIZE, NATIVE_SIZE)
    torch.testing.assert_close(encoder(images), reference_tokens(reference, images), atol=1e-5, rtol=1e-5)
    assert (encoder.num_register_tokens, encoder.dim, encoder.patch_size) == (VARIANTS[variant][0], HIDDEN, 14)
    assert encoder.name == path.stem
    assert encoder.model.config.image_size == NATIVE_SIZE  # sqrt(N - 1) * patch, as 518 for the released ones


@pytest.mark.parametrize("size", [42, 98])
def test_registers_interpolate_like_timm(tmp_path: Path, size: int) -> None:
    """transformers' registers model and timm both resample position embeddings bicubic with antialias;
    the plain transformers model does not antialias, so it is checked for its grid only (next test)."""
    reference, path = write_checkpoint(tmp_path, "reg4")
    images = torch.randn(2, 3, size, size)
    torch.testing.assert_close(load_dinov2(path)(images), reference_tokens(reference, images), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["plain", "reg4"])
@pytest.mark.parametrize("size", [42, NATIVE_SIZE, 98])
def test_tokens_shape_norm_and_no_gradient(tmp_path: Path, variant: str, size: int) -> None:
    _, path = write_checkpoint(tmp_path, variant)
    encoder = load_dinov2(path)
    tokens = encoder(torch.randn(3, 3, size, size))
    grid = encoder.grid(size)
    assert grid == size // 14
    assert tokens.shape == (3, grid * grid, HIDDEN) and tokens.dtype == torch.float32
    torch.testing.assert_close(tokens.norm(dim=-1), torch.ones(3, grid * grid))
    assert not tokens.requires_grad
    assert not any(parameter.requires_grad for parameter in encoder.parameters())
    assert encoder.metadata(size) == {"encoder": path.stem, "dim": HIDDEN, "patch_size": 14,
                                      "num_register_tokens": VARIANTS[variant][0], "image_size": size, "grid": grid}


def test_stays_eval_and_tokens_serve_as_loss_targets(tmp_path: Path) -> None:
    _, path = write_checkpoint(tmp_path, "plain")
    encoder = load_dinov2(path)
    nn.Sequential(encoder).train()
    assert not encoder.training and not encoder.model.training
    # inference-mode tensors would fail here: they cannot be saved for backward
    prediction = torch.randn(2, 16, HIDDEN, requires_grad=True)
    target = encoder(torch.randn(2, 3, NATIVE_SIZE, NATIVE_SIZE))
    (1 - F.cosine_similarity(prediction, target, dim=-1)).mean().backward()
    assert prediction.grad is not None


@pytest.mark.parametrize("variant", ["plain", "swiglu_reg4"])
def test_transformers_folder_matches_original_checkpoint(tmp_path: Path, variant: str) -> None:
    _, path = write_checkpoint(tmp_path, variant)
    from_checkpoint = load_dinov2(path)
    folder = tmp_path / "dinov2-tiny"
    from_checkpoint.model.save_pretrained(folder)
    from_folder = load_dinov2(folder)
    assert type(from_folder.model) is type(from_checkpoint.model)
    assert from_folder.name == "dinov2-tiny"
    assert from_folder.metadata(70) == {**from_checkpoint.metadata(70), "encoder": "dinov2-tiny"}
    for size in (NATIVE_SIZE, 70):
        images = torch.randn(2, 3, size, size)
        torch.testing.assert_close(from_folder(images), from_checkpoint(images), atol=1e-6, rtol=1e-6)


def test_released_geometry_gives_16x16_grid_at_224(tmp_path: Path) -> None:
    """Trained at 518 px like the released checkpoints: 224 px input -> 16x16 = 256 tokens, not 14x14."""
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=518,
                             patch_size=14)).save_pretrained(tmp_path / "dinov2")
    encoder = load_dinov2(tmp_path / "dinov2")
    assert encoder.metadata(224)["grid"] == 16
    assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 256, 64)


def test_chunked_blocks_are_flattened(tmp_path: Path) -> None:
    """block_chunks > 0 stores blocks.{chunk}.{i}, with i the global block index."""
    reference, path = write_checkpoint(tmp_path, "reg4")
    state_dict = torch.load(path, weights_only=True)
    # one chunk holding both blocks: blocks.0.0.* and blocks.0.1.*
    chunked = {re.sub(r"^blocks\.(\d+)\.", r"blocks.0.\1.", key): value for key, value in state_dict.items()}
    assert "blocks.0.1.norm1.weight" in chunked
    torch.save(chunked, path)
    images = torch.randn(1, 3, NATIVE_SIZE, NATIVE_SIZE)
    torch.testing.assert_close(load_dinov2(path)(images), reference_tokens(reference, images), atol=1e-5, rtol=1e-5)


def test_tampered_checkpoint_names_missing_and_unused_keys(tmp_path: Path) -> None:
    _, path = write_checkpoint(tmp_path, "plain")
    state_dict = torch.load(path, weights_only=True)
    del state_dict["blocks.1.ls2.gamma"], state_dict["mask_token"]
    state_dict["head.weight"] = torch.zeros(10, HIDDEN)
    torch.save(state_dict, path)
    with pytest.raises(ValueError) as error:
        load_dinov2(path)
    for key in ("blocks.1.ls2.gamma", "mask_token", "head.weight"):
        assert key in str(error.value)


def test_wrong_shape_is_rejected(tmp_path: Path) -> None:
    _, path = write_checkpoint(tmp_path, "plain")
    state_dict = torch.load(path, weights_only=True)
    state_dict["blocks.0.ls1.gamma"] = torch.ones(HIDDEN + 1)
    torch.save(state_dict, path)
    with pytest.raises(RuntimeError, match="layer_scale1"):
        load_dinov2(path)


def test_folder_with_missing_weights_is_rejected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, image_size=56,
                             patch_size=14)).save_pretrained(tmp_path / "dinov2")
    weights = tmp_path / "dinov2" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["layernorm.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layernorm.weight"):
        load_dinov2(tmp_path / "dinov2")


def test_not_a_dinov2_is_rejected_at_once(tmp_path: Path) -> None:
    cases = {
        tmp_path / "absent": None,
        tmp_path / "folder_without_config": lambda path: path.mkdir(),
        tmp_path / "bytes.pth": lambda path: path.write_bytes(b"not a checkpoint"),
        tmp_path / "other.pth": lambda path: torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, path),
        tmp_path / "clip": lambda path: (path.mkdir(), (path / "config.json").write_text(
            json.dumps({"model_type": "clip_vision_model"}))),
    }
    for path, make in cases.items():
        if make:
            make(path)
        with pytest.raises((FileNotFoundError, ValueError)) as error:
            load_dinov2(path)
        assert f"{EXPECTED_ERROR} {path}" in str(error.value)


def test_full_size_config_gives_the_real_token_grid():
    with torch.device("meta"):
        dino = Dinov2Model(Dinov2Config(**DINOV2_VITL14_CONFIG))
        tokens = dino(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert tokens.shape == (1, 1 + 16 * 16, 1024)
