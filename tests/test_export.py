"""The exported model folder (urepa.export): what training writes (the trained weights in diffusers form, the
scheduler with the trained parameterisation, the align heads, weights.json) and what sampling and the analyses
read back from it."""
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (CPU, SMOKE_IMAGE_SIZE, batch_of, make_trainer, settings_for, unet_prediction,
                      write_description, write_partial_weights)
from urepa.export import (DESCRIPTION, TRAINED_UNET, BaseUnetMismatchError, base_unet_record, head_target_norm,
                          inference_dtype, is_pretrained, load_align_head, load_finetuned_pipeline, read_description,
                          save_pretrained_description, trained_scheduler)
from urepa.models import TRAINABLE_BLOCKS
from urepa.sd15 import load_noise_scheduler, load_unet
from urepa.train import Trainer
from urepa.vae import VaeMismatchError, load_autoencoder, vae_record


# -- writing ------------------------------------------------------------------------------------------------


def unet_inputs(data, trainer: Trainer) -> tuple:
    latents = batch_of(trainer, data)["latent_mean"][:2].float() * data["normalisation"].scaling_factor
    return latents, torch.tensor([50, 700]), torch.from_numpy(data["clip"][[0, data["null_index"]]]).float()


@pytest.mark.parametrize("finetune, prediction", [("lora", "epsilon"), ("partial", "v")])
def test_save_weights_exports_what_was_trained_in_diffusers_form(data, tmp_path, finetune, prediction):
    """LoRA: pytorch_lora_weights.safetensors, which a stock pipeline loads into the trained U-Net; partial:
    a unet/ folder. Both: the scheduler with the trained parameterisation, and the align heads with what
    rebuilds them."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    settings = settings_for(steps=8, finetune=finetune, prediction=prediction, learning_rate=1e-2)
    trainer = make_trainer(data, settings, tmp_path / "run")
    trainer.step(batch_of(trainer, data))
    model = trainer.accelerator.unwrap_model(trainer.model)
    inputs = unet_inputs(data, trainer)
    expected = unet_prediction(model.unet, inputs)
    trainer.save_weights(tmp_path / "out")

    pipeline = StableDiffusionPipeline.from_pretrained(str(data["sd15"]), local_files_only=True)
    base = unet_prediction(pipeline.unet, inputs)
    if finetune == "lora":
        assert not (tmp_path / "out" / "unet").exists()
        pipeline.load_lora_weights(str(tmp_path / "out"))
        loaded = unet_prediction(pipeline.unet, inputs)
    else:
        assert not (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
        loaded = unet_prediction(UNet2DConditionModel.from_pretrained(str(tmp_path / "out" / "unet")), inputs)
    assert (expected - base).abs().max() > 1e-4, "the step changed nothing: the comparison would prove nothing"
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)

    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == {"epsilon": "epsilon", "v": "v_prediction"}[prediction]
    assert scheduler["num_train_timesteps"] == trainer.noise_scheduler.config.num_train_timesteps
    heads = load_file(tmp_path / "out" / "align_heads.safetensors")
    assert heads.keys() == model.heads.state_dict().keys()
    for key, value in model.heads.state_dict().items():
        assert torch.equal(heads[key], value)
    meta = json.loads((tmp_path / "out" / "align_heads.json").read_text())
    assert meta == {"layers": settings["align_layers"], "grid": data["dino"].attrs["grid"],
                    "projector": settings["projector"], "projector_hidden": settings["projector_hidden"],
                    "target_spatial_norm": None, "dim": data["dino"].attrs["dim"]}


def test_a_snapshot_of_the_trained_parameters_samples_the_images_of_the_whole_unet(data, tmp_path):
    """A partial fine-tune's snapshot (`trained_only`) holds the trained parameters alone and records the base
    U-Net; loaded, the pipeline's U-Net equals the whole exported U-Net's tensor for tensor, and samples the same
    images, in a fraction of the bytes."""
    from safetensors.torch import load_file

    from urepa.sample import generate_samples

    trainer = make_trainer(data, settings_for(steps=8, finetune="partial", learning_rate=1e-2), tmp_path / "run")
    trainer.step(batch_of(trainer, data))
    base = base_unet_record(data["sd15"])
    whole, snapshot = tmp_path / "whole", tmp_path / "snapshot"
    trainer.save_weights(whole, base)
    trainer.save_weights(snapshot, base, trained_only=True)

    assert (whole / "unet").is_dir() and not (snapshot / "unet").exists()
    unet = trainer.accelerator.unwrap_model(trainer.model).unet
    trained = load_file(snapshot / TRAINED_UNET)
    assert trained.keys() == {name for name, p in unet.named_parameters() if p.requires_grad}
    assert all(name.startswith(tuple(block + "." for block in TRAINABLE_BLOCKS)) for name in trained)
    assert read_description(snapshot)["base_unet"] == base and base["path"] == str(data["sd15"] / "unet")
    size = {folder: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) for folder in (whole, snapshot)}
    assert size[snapshot] < 0.8 * size[whole]

    pipes = {folder: load_finetuned_pipeline(data["sd15"], folder, CPU) for folder in (whole, snapshot)}
    loaded = {folder: pipe.unet.state_dict() for folder, pipe in pipes.items()}
    assert loaded[whole].keys() == loaded[snapshot].keys()
    for name, tensor in loaded[whole].items():
        assert torch.equal(loaded[snapshot][name], tensor), name
    frozen = load_unet(data["sd15"]).state_dict()
    assert any(not torch.equal(loaded[snapshot][name], frozen[name]) for name in trained)  # trained: not the base
    settings = {"sampler": "ddim", "steps": 3, "cfg_scale": 2.0, "guidance_low": 0.0, "guidance_high": 1.0}
    images = {folder: generate_samples(pipe, data["clip"], data["null_index"], num_classes=1, images_per_class=2,
                                       out_dir=tmp_path / f"samples-{folder.name}", settings=settings, seed=3,
                                       batch_size=2, weights_digest="w", vae=pipe.vae_record)
              for folder, pipe in pipes.items()}
    for i in range(2):
        pixels = [np.asarray(Image.open(images[folder] / f"{i:06d}.png")) for folder in (whole, snapshot)]
        assert np.array_equal(*pixels)


@pytest.mark.parametrize("finetune", ["lora", "partial"])
def test_trained_parameters_go_only_into_the_base_unet_they_were_trained_from(data, tmp_path, finetune):
    """LoRA and a snapshot's trained parameters hold only what training changed: loaded with SD-1.5's folder in
    another place they are accepted, with another U-Net in it refused, naming both."""
    trainer = make_trainer(data, settings_for(steps=8, finetune=finetune), tmp_path / "run")
    trainer.save_weights(tmp_path / "snapshot", base_unet_record(data["sd15"]), trained_only=True)
    elsewhere = tmp_path / "sd15"
    shutil.copytree(data["sd15"], elsewhere)
    load_finetuned_pipeline(elsewhere, tmp_path / "snapshot", CPU)  # the same base: accepted

    other = load_unet(elsewhere)
    with torch.no_grad():
        other.conv_in.weight.add_(0.01)
    other.save_pretrained(elsewhere / "unet")
    with pytest.raises(BaseUnetMismatchError, match=rf"trained from the U-Net in {data['sd15'] / 'unet'} "
                                                    rf"\(fingerprint \w+\), not from {elsewhere / 'unet'}"):
        load_finetuned_pipeline(elsewhere, tmp_path / "snapshot", CPU)


def test_the_baseline_exports_no_align_heads(data, tmp_path):
    trainer = make_trainer(data, settings_for(steps=8, align_coeff=0.0), tmp_path / "run")
    trainer.save_weights(tmp_path / "out")
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert not list((tmp_path / "out").glob("align_heads.*"))
    assert head_target_norm(tmp_path / "out") is None


def test_an_irepa_folder_rebuilds_its_conv_head_and_names_its_targets_normalisation(data, tmp_path):
    """The 3x3 conv head reloads to the trained one's tokens, and the folder says its targets were spatially
    normalised (alpha), so that the analyses score the head against the same targets."""
    settings = settings_for("irepa", steps=8)
    trainer = make_trainer(data, settings, tmp_path / "run")
    trainer.step(batch_of(trainer, data))
    trainer.save_weights(tmp_path / "out")
    assert head_target_norm(tmp_path / "out") == 0.6
    head = load_align_head(tmp_path / "out", "mid", CPU)
    trained = trainer.accelerator.unwrap_model(trainer.model).heads["mid"]
    assert head.proj[0].kernel_size == (3, 3)
    features = torch.randn(2, head.proj[0].in_channels, 2, 2)
    torch.testing.assert_close(head(features), trained(features))


@pytest.mark.parametrize("finetune, align_coeff", [("lora", 0.8), ("partial", 0.0)])
def test_an_exported_folder_describes_how_its_weights_were_trained(data, tmp_path, finetune, align_coeff):
    """weights.json: the fine-tune mode, parameterisation and aligned layers the readers (sampling, the
    analyses) take from the folder itself, and the VAE the training latents came from."""
    settings = settings_for(steps=8, finetune=finetune, align_coeff=align_coeff, prediction="v")
    make_trainer(data, settings, tmp_path / "run").save_weights(tmp_path / "out")
    description = read_description(tmp_path / "out")
    assert description == json.loads((tmp_path / "out" / DESCRIPTION).read_text())
    assert description == {"finetune": finetune, "prediction": "v", "align_layers": settings["align_layers"],
                           "align_coeff": align_coeff, "vae": data["vae_weights"]}
    assert data["vae_weights"]["fingerprint"] and data["vae_weights"]["path"].endswith("vae")


def test_a_folder_without_its_description_is_refused_with_what_to_do(smoke_inputs, tmp_path):
    load_unet(smoke_inputs["sd15"]).save_pretrained(tmp_path / "unet")
    trained_scheduler(load_noise_scheduler(smoke_inputs["sd15"]), "epsilon").save_pretrained(tmp_path / "scheduler")
    for read in (lambda: read_description(tmp_path),
                 lambda: load_finetuned_pipeline(smoke_inputs["sd15"], tmp_path, torch.device("cpu"))):
        with pytest.raises(FileNotFoundError, match=f"has no {DESCRIPTION}: .* re-export them"):
            read()


# -- reading ------------------------------------------------------------------------------------------------


def test_the_runs_unet_replaces_the_base_one(pipeline, smoke_inputs):
    base = dict(load_unet(smoke_inputs["sd15"]).named_parameters())
    for name, loaded in pipeline.unet.named_parameters():
        expected = base[name] + 0.01 if name.startswith("mid_block.") else base[name]
        torch.testing.assert_close(loaded, expected)


def test_the_pretrained_folder_holds_no_unet_weights_and_samples_sd15_as_it_is(smoke_inputs, tmp_path):
    """The `pretrained` row's weights folder: a description and SD-1.5's scheduler, no weights; the pipeline
    sampled from it has SD-1.5's U-Net, tensor for tensor, its scheduler and VAE; another base U-Net is refused."""
    sd15 = smoke_inputs["sd15"]
    save_pretrained_description(tmp_path, sd15, vae_record("sd15", sd15 / "vae"))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "scheduler/scheduler_config.json", "weights.json"]
    assert is_pretrained(tmp_path) and read_description(tmp_path)["align_layers"] == []
    pipe = load_finetuned_pipeline(sd15, tmp_path, CPU)
    base, loaded = load_unet(sd15).state_dict(), pipe.unet.state_dict()
    assert loaded.keys() == base.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in base.items())
    def schedule(scheduler):  # the config's values (diffusers also notes which keys took defaults)
        return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}

    assert schedule(pipe.scheduler) == schedule(load_noise_scheduler(sd15))
    assert pipe.vae_record["fingerprint"] == vae_record("sd15", sd15 / "vae")["fingerprint"]
    description = read_description(tmp_path)
    (tmp_path / DESCRIPTION).write_text(json.dumps({**description, "base_unet": {
        **description["base_unet"], "fingerprint": "another U-Net"}}))
    with pytest.raises(BaseUnetMismatchError, match="another U-Net"):
        load_finetuned_pipeline(sd15, tmp_path, CPU)


def test_lora_weights_are_fused_into_the_unet_they_were_trained_on(smoke_inputs, tmp_path):
    """A LoRA export (peft keys, as the trainer writes them) sampled from: the pipeline's U-Net computes what
    the adapted U-Net computed, with the adapter layers gone and nothing else of SD-1.5 changed."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    from urepa.models import make_trainable

    adapted = load_unet(smoke_inputs["sd15"])
    make_trainable(adapted, "lora", lora_rank=4, lora_targets="attn+conv")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.2)  # a trained adapter: B != 0
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(adapted),
                                              safe_serialization=True)
    trained_scheduler(load_noise_scheduler(smoke_inputs["sd15"]), "epsilon").save_pretrained(tmp_path / "scheduler")
    write_description(tmp_path, "lora", smoke_inputs["sd15"])

    heard = []  # what diffusers logs (its loggers do not propagate to the root logger)
    listener = logging.Handler()
    listener.emit = heard.append
    logging.getLogger("diffusers").addHandler(listener)
    loader_filters = list(logging.getLogger("diffusers.loaders.lora_base").filters)
    try:
        pipe = load_finetuned_pipeline(smoke_inputs["sd15"], tmp_path, torch.device("cpu"))
    finally:
        logging.getLogger("diffusers").removeHandler(listener)
    # The LoRA has no text-encoder keys, as expected: diffusers' warning that it found none is left out, there only.
    assert not [record for record in heard if "No LoRA keys" in record.getMessage()]
    assert logging.getLogger("diffusers.loaders.lora_base").filters == loader_filters
    assert not any(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([10, 600]), torch.randn(2, 77, 32)
    with torch.no_grad():
        expected = adapted(x, t, encoder_hidden_states=context).sample
        base = load_unet(smoke_inputs["sd15"])(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=context).sample, expected,
                                   rtol=1e-4, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3  # the adapter does change the output
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_weights_are_loaded_in_the_requested_dtype(smoke_inputs, tmp_path):
    load_unet(smoke_inputs["sd15"]).save_pretrained(tmp_path / "unet")
    trained_scheduler(load_noise_scheduler(smoke_inputs["sd15"]), "epsilon").save_pretrained(tmp_path / "scheduler")
    write_description(tmp_path, "full", smoke_inputs["sd15"])
    pipe = load_finetuned_pipeline(smoke_inputs["sd15"], tmp_path, torch.device("cpu"), dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    on_meta = load_finetuned_pipeline(smoke_inputs["sd15"], tmp_path, torch.device("meta"))
    assert on_meta.unet.device.type == on_meta.vae.device.type == "meta"  # moved to the device asked for
    assert load_finetuned_pipeline(smoke_inputs["sd15"], tmp_path, torch.device("cpu")).unet.dtype == \
        torch.float32


def test_weights_without_a_scheduler_folder_are_refused(smoke_inputs, tmp_path):
    (tmp_path / "unet").mkdir()
    write_description(tmp_path, "partial", smoke_inputs["sd15"])
    with pytest.raises(FileNotFoundError, match="no scheduler/ folder"):
        load_finetuned_pipeline(smoke_inputs["sd15"], tmp_path, torch.device("cpu"))



def test_inference_runs_in_float16_on_cuda_and_float32_on_the_cpu():
    assert inference_dtype(torch.device("cuda")) == torch.float16
    assert inference_dtype("cuda:1") == torch.float16
    assert inference_dtype(torch.device("cpu")) == torch.float32


# -- the VAE of the weights -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def e2e_weights(smoke_inputs, tmp_path_factory):
    """A partial export (perturbed mid block) trained on the latents of the second VAE, `e2e`: weights.json
    records that VAE."""
    weights = write_partial_weights(tmp_path_factory.mktemp("e2e_weights"), smoke_inputs["sd15"], "epsilon")
    description = json.loads((weights / DESCRIPTION).read_text())
    description["vae"] = vae_record("e2e", smoke_inputs["e2e_vae"])
    (weights / DESCRIPTION).write_text(json.dumps(description))
    return weights


def test_the_pipeline_decodes_with_the_vae_the_weights_were_trained_on(smoke_inputs, e2e_weights):
    pipe = load_finetuned_pipeline(smoke_inputs["sd15"], e2e_weights, CPU)  # default: the folder recorded
    assert pipe.vae.config.scaling_factor == 0.25 and pipe.vae_record["name"] == "e2e"
    expected = load_autoencoder(smoke_inputs["e2e_vae"]).state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in pipe.vae.state_dict().items())


def test_another_vae_is_refused_unless_allowed(smoke_inputs, e2e_weights, caplog):
    sd15_vae = smoke_inputs["sd15"] / "vae"
    with pytest.raises(VaeMismatchError, match=r"made with VAE 'e2e' .* but given VAE 'sd15'"):
        load_finetuned_pipeline(smoke_inputs["sd15"], e2e_weights, CPU, vae_dir=sd15_vae, vae_name="sd15")
    with caplog.at_level(logging.WARNING, logger="urepa.export"):
        pipe = load_finetuned_pipeline(smoke_inputs["sd15"], e2e_weights, CPU, vae_dir=sd15_vae, vae_name="sd15",
                                       allow_other_vae=True)
    assert "trained on the latents of VAE 'e2e', with VAE 'sd15'" in caplog.text
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.vae_record["name"] == "sd15"


def test_a_stock_pipeline_with_the_swapped_vae_makes_our_samplers_images(smoke_inputs, e2e_weights, tmp_path):
    """The README's recipe with its VAE line: a stock StableDiffusionPipeline given the run's VAE (and weights and
    scheduler), unguided, makes the images our sampler makes, which decodes with the VAE from weights.json."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from urepa.sample import generate_samples, initial_noise

    pipe = StableDiffusionPipeline.from_pretrained(str(smoke_inputs["sd15"]), safety_checker=None,
                                                   local_files_only=True,
                                                   vae=AutoencoderKL.from_pretrained(str(smoke_inputs["e2e_vae"])),
                                                   unet=UNet2DConditionModel.from_pretrained(str(e2e_weights / "unet")))
    pipe.scheduler = DDIMScheduler.from_pretrained(str(e2e_weights), subfolder="scheduler")
    embeddings = np.random.default_rng(0).standard_normal((2, 77, 32)).astype(np.float32)
    settings = {"sampler": "ddim", "steps": 3, "cfg_scale": 1.0, "guidance_low": 0.0, "guidance_high": 1.0}
    ours_pipe = load_finetuned_pipeline(smoke_inputs["sd15"], e2e_weights, CPU)
    ours = generate_samples(ours_pipe, embeddings, 1, num_classes=1, images_per_class=2, out_dir=tmp_path / "ours",
                            settings=settings, seed=3, batch_size=2, weights_digest="w", vae=ours_pipe.vae_record)
    size = SMOKE_IMAGE_SIZE // 8
    noise = torch.stack([initial_noise(i, 3, (4, size, size)) for i in range(2)])
    stock = pipe(prompt_embeds=torch.from_numpy(embeddings[[0, 0]]), num_inference_steps=3, guidance_scale=1.0,
                 latents=noise, output_type="np").images
    sd15_decoded = StableDiffusionPipeline.from_pretrained(
        str(smoke_inputs["sd15"]), safety_checker=None, local_files_only=True, scheduler=pipe.scheduler,
        unet=pipe.unet)(prompt_embeds=torch.from_numpy(embeddings[[0, 0]]), num_inference_steps=3, guidance_scale=1.0,
                        latents=noise, output_type="np").images
    for i in range(2):
        ours_image = np.asarray(Image.open(ours / f"{i:06d}.png"), dtype=np.int16)
        assert np.abs(ours_image - np.round(stock[i] * 255).astype(np.int16)).max() <= 1
        # and the VAE matters: SD-1.5's own decoder makes other images of the same latents
        assert np.abs(ours_image - np.round(sd15_decoded[i] * 255).astype(np.int16)).mean() > 5
    assert json.loads((ours / "sampling.json").read_text())["vae"]["name"] == "e2e"
