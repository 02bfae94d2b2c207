"""Stage 3b, REPA-E on SD-1.5: a tuning run on the smoke caches end to end — its export (a folded AutoencoderKL a
stock pipeline loads, the U-Net trained alongside), a run with nothing to learn exporting the input VAE bit for
bit, kill-and-resume equal to uninterrupted, and the collapse guard."""
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import CONFIG, CPU, DINO_SIZE, SEED, SMOKE_IMAGE_SIZE
from test_reconstruction import downloads_refused
from urepa import launch
from urepa.config import SPEED_KEYS, tune_settings, tune_unet_settings
from urepa.vae import LatentNormalisation, load_autoencoder
from urepa.vae_tuning import LOG_COLUMNS, CollapseError, VaeTuner, rows_per_class, tune_run

pytestmark = pytest.mark.slow

STEPS = 4


def settings(**tune_overrides) -> tuple[dict, dict]:
    """The smoke tier's `repae` tuning settings at STEPS steps, checkpointed every 2, and its U-Net side."""
    tune = tune_settings(CONFIG, "smoke", "repae") | {"max_steps": STEPS, "checkpoint_every": 2} | tune_overrides
    unet = tune_unet_settings(CONFIG, "smoke", "repae") | {"max_steps": STEPS, "batch_size": tune["batch_size"]}
    return unet, tune


def run_args(data, out, unet, tune, vae_name="repae") -> dict:
    """tune_run's arguments, as the tune_vae rule hands them to urepa.launch.train."""
    return dict(caches={k: str(v) for k, v in data["caches"].items()}, sd15_dir=str(data["sd15"]),
                dinov2_path=str(data["dinov2"]), vgg16=None, unet_settings=unet, tune=tune, vae_name=vae_name,
                states_dir=str(out / "train_state"), out_dir=str(out / "tuned"), seed=SEED, device="cpu",
                num_workers=0, image_size=SMOKE_IMAGE_SIZE, dino_size=DINO_SIZE)


def run(data, out, unet, tune, vae_name="repae"):
    return tune_run(**{**run_args(data, out, unet, tune, vae_name), "device": CPU})


@pytest.fixture(scope="module")
def tuned(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    run_dir = run(data, out, *settings())
    return out / "tuned", run_dir


def test_the_export_is_a_folded_autoencoder_a_stock_pipeline_loads(tuned, data):
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    out, _ = tuned
    vae = AutoencoderKL.from_pretrained(out / "vae")
    frozen = load_autoencoder(data["vae_dir"])
    assert vae.config.scaling_factor == frozen.config.scaling_factor  # the normaliser lives in the weights
    pipe = StableDiffusionPipeline.from_pretrained(data["sd15"], vae=vae, safety_checker=None,
                                                   requires_safety_checker=False)
    assert pipe.vae is vae
    changed = [k for k, v in frozen.state_dict().items() if not torch.equal(v, vae.state_dict()[k])]
    assert changed  # it was tuned
    stats = json.loads((out / "latent_stats.json").read_text())
    assert stats["running_mean"] != stats["reference_mean"]


def test_the_log_has_every_term_of_every_pass_at_every_step(tuned):
    out, _ = tuned
    log = pd.read_csv(out / "train_log.csv")
    assert list(log.columns) == LOG_COLUMNS and log["step"].tolist() == list(range(1, STEPS + 1))
    for column in ("loss_vae", "l1", "lpips", "kl", "align", "loss_unet", "loss_diff", "loss_token",
                   "grad_norm_vae", "grad_norm_unet", "latent_std_0"):
        assert np.isfinite(log[column]).all() and (log[column] != 0).all(), column
    assert log["loss_d"].isna().all()  # the GAN is off by default
    assert (out / "losses.png").stat().st_size > 0


def test_run_json_records_the_speed_options_the_run_had(tuned):
    _, run_dir = tuned
    unet, _ = settings()
    launch = json.loads((run_dir / "run.json").read_text())["launches"][-1]
    assert {key: launch[key] for key in SPEED_KEYS} == {key: unet[key] for key in SPEED_KEYS}


def test_the_unet_trained_alongside_is_recorded_on_the_tuned_vae(tuned):
    out, _ = tuned
    for folder in (out / "unet", out / "unet" / "ema"):
        description = json.loads((folder / "weights.json").read_text())
        assert description["vae"]["name"] == "repae" and description["vae"]["path"] == str(out / "vae")
        assert (folder / "pytorch_lora_weights.safetensors").is_file()
        assert (folder / "align_heads.safetensors").is_file()


def test_the_joint_row_is_a_run_folder_of_the_unet_trained_alongside(tuned, data, tmp_path):
    """What sampling, metrics and the report read of a run folder, from the tuning run; its pipeline decodes with
    the tuned VAE it records."""
    from urepa.export import load_finetuned_pipeline
    from urepa.vae_tuning import export_joint_model

    out, _ = tuned
    model = tmp_path / "model"
    export_joint_model(out, model)
    assert json.loads((model / "config.json").read_text())["final_step"] == STEPS
    for name in ("pytorch_lora_weights.safetensors", "ema/weights.json", f"snapshots/step-{STEPS:07d}/weights.json",
                 "loss_curve.png", "train_log.csv"):
        assert (model / name).is_file(), name
    pipe = load_finetuned_pipeline(data["sd15"], model / "ema", CPU)
    tuned_vae = load_autoencoder(out / "vae")
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), tuned_vae.state_dict().values()))


def test_the_folded_vae_encodes_to_what_the_unet_was_trained_on(data, tmp_path):
    """The exported VAE's posterior mean * scaling_factor equals the pinned latents of the tuned VAE (to 1e-5)."""
    unet, tune = settings(max_steps=2)
    tuner = make_tuner(data, tmp_path / "state", unet, tune)
    tuner.run()
    record = tuner.save_vae(tmp_path / "vae")
    folded = load_autoencoder(record["path"])
    images = tuner.dataset[data["rows"][:2]]["image"]
    scaling = LatentNormalisation.from_config(folded.config).scaling_factor
    with torch.no_grad():
        tuned_mean = tuner.e2e.vae.eval().encode(images).latent_dist.mean
        expected = tuner.e2e.pinning(tuned_mean) * scaling
        torch.testing.assert_close(folded.encode(images).latent_dist.mean * scaling, expected, rtol=0, atol=1e-5)


def make_tuner(data, run_dir, unet, tune) -> VaeTuner:
    from urepa.latent_pinning import cache_moments
    from urepa.reconstruction import load_lpips
    from urepa.sd15 import load_noise_scheduler, load_unet
    from urepa.vae_tuning import TuningRows

    table = data["table"]
    rows = rows_per_class(table, data["rows"], tune["images_per_class"])
    return VaeTuner(load_autoencoder(data["vae_dir"]), load_unet(data["sd15"]), load_noise_scheduler(data["sd15"]),
                    TuningRows(table["img_path"].tolist(), SMOKE_IMAGE_SIZE, data["caches"]["vae"],
                               data["caches"]["dino"], table["class_id"].to_numpy()),
                    rows, data["clip"], data["null_index"], data["dino"].attrs["dim"], data["dino"].attrs["grid"],
                    cache_moments(data["vae"]["mean"], data["vae"]["std"], rows), load_lpips(None, "cpu")[0],
                    unet, tune, run_dir, SEED, CPU, 0, "repae")


def test_a_run_with_nothing_to_learn_exports_the_input_vae_bit_for_bit(data, tmp_path):
    """Every learning rate 0 and the normaliser's momentum 0: the exported VAE is SD-1.5's, every tensor equal.
    (With every torch and torchvision download route refused: the stage fetches nothing.)"""
    unet, tune = settings(max_steps=2, vae_learning_rate=0.0, normaliser_momentum=0.0, gan=True,
                          disc_learning_rate=0.0)
    unet["learning_rate"] = 0.0
    with downloads_refused():
        run(data, tmp_path, unet, tune)
    exported = load_file(tmp_path / "tuned" / "vae" / "diffusion_pytorch_model.safetensors")
    original = load_file(data["vae_dir"] / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == original.keys()
    for key, value in original.items():
        assert torch.equal(exported[key], value), key


def test_a_killed_run_resumes_to_the_uninterrupted_result_bit_for_bit(tuned, data, tmp_path, monkeypatch):
    uninterrupted, _ = tuned
    original_step = VaeTuner.step

    def killed_at_step_3(self, batch):
        if self.state.step == 2:
            raise KeyboardInterrupt("killed")
        return original_step(self, batch)

    monkeypatch.setattr(VaeTuner, "step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(data, tmp_path, *settings())
    monkeypatch.setattr(VaeTuner, "step", original_step)
    run_dir = run(data, tmp_path, *settings())
    assert json.loads((run_dir / "run.json").read_text())["launches"][-1]["from_step"] == 2
    resumed = tmp_path / "tuned"
    for name in ("vae/diffusion_pytorch_model.safetensors", "unet/pytorch_lora_weights.safetensors",
                 "unet/ema/pytorch_lora_weights.safetensors", "unet/align_heads.safetensors"):
        a, b = load_file(uninterrupted / name), load_file(resumed / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name} {key}"
    logged = [pd.read_csv(folder / "train_log.csv").drop(columns="step_time") for folder in (uninterrupted, resumed)]
    pd.testing.assert_frame_equal(*logged)


def test_a_vae_without_gradient_stops_the_run_naming_the_step_and_checkpoint(data, tmp_path):
    unet, tune = settings(l1_weight=0.0, lpips_weight=0.0, kl_weight=0.0, vae_align_coeff=0.0)
    with pytest.raises(CollapseError, match=r"grad_norm_vae is 0 at step 1; the last good checkpoint is none"):
        run(data, tmp_path, unet, tune)


def test_collapsed_latents_stop_the_run(data, tmp_path):
    unet, tune = settings(collapse_std_ratio=100.0)  # planted: no spread can pass this
    with pytest.raises(CollapseError, match=r"latent std per channel .* at step 1"):
        run(data, tmp_path, unet, tune)


def test_rows_per_class_takes_the_first_valid_rows_of_each_class():
    table = pd.DataFrame({"class_id": [0, 0, 0, 1, 1, 1]})
    assert rows_per_class(table, np.array([0, 2, 3, 4, 5]), 2).tolist() == [0, 2, 3, 4]
    assert rows_per_class(table, np.array([0, 2]), None).tolist() == [0, 2]


def test_the_gan_trains_the_discriminator_alone_during_its_warm_up(data, tmp_path):
    unet, tune = settings(max_steps=2, gan=True, disc_warmup_steps=1, anchor_weight=1.0,
                          vae_align_terms="token+manifold")
    run(data, tmp_path, unet, tune)
    log = pd.read_csv(tmp_path / "tuned" / "train_log.csv")
    assert np.isfinite(log[["loss_d", "logits_real", "logits_fake", "grad_norm_d", "anchor"]]).all().all()
    assert log["gan"].tolist()[0] == 0.0 and log["gan"].tolist()[1] != 0.0
    assert (log["anchor"] > 0).all()


def test_two_processes_tune_as_one_does(data, tmp_path):
    """The same tuning run (the manifold term on both sides, sample-mode Gram) on one process and on two gloo
    processes launched as the tune_vae rule launches them: the same per-step terms of every pass and latent moments,
    and the same exported VAE and U-Net, up to the reordering of sums (tolerances of tests/test_train_distributed.py),
    in the same state folder (identity)."""
    unet, tune = settings(vae_align_terms="token+manifold")
    assert unet["manifold_mode"] == "sample" and unet["manifold_coeff"] > 0
    one = run(data, tmp_path / "one", unet, tune)
    launch.train(run_args(data, tmp_path / "two", unet | {"processes": 2}, tune), threads=2,
                 log_path=tmp_path / "two.log", stage="tune_vae")
    assert "launching 2 tune_vae processes" in (tmp_path / "two.log").read_text()
    (two,) = [marker.parent for marker in (tmp_path / "two" / "train_state").glob("*/run.json")]
    assert two.name == one.name
    assert json.loads((two / "run.json").read_text())["launches"][0]["processes"] == 2
    logs = [pd.read_csv(out / "tuned" / "train_log.csv") for out in (tmp_path / "one", tmp_path / "two")]
    compared = [c for c in LOG_COLUMNS if c not in ("step_time",) and logs[0][c].notna().all()]
    assert {"loss_vae", "align", "lpips", "loss_manifold", "grad_norm_vae", "latent_std_3"} <= set(compared)
    for column in compared:
        one_process, two_processes = (torch.tensor(log[column].to_numpy()) for log in logs)
        # Step 1 starts from the same weights: only the sums' order differs. Later steps follow weights that Adam
        # moved by up to the learning rate where a gradient is near zero (its last bits differ): looser.
        torch.testing.assert_close(two_processes[0], one_process[0], rtol=1e-5, atol=1e-8,
                                   msg=lambda m: f"{column} at step 1: {m}")
        # A latent channel's mean, near 0, is measured against the channel's spread.
        scale = logs[0][column.replace("mean", "std")].abs().mean() if column.startswith("latent_mean") else 0.0
        # rtol 2e-3: since the tuner runs with train's default speed options (fused AdamW), grad_norm_vae at step 4
        # differed by 1.03e-3 relative in one run (measured).
        torch.testing.assert_close(two_processes, one_process, rtol=2e-3, atol=max(1e-3 * scale, 1e-6),
                                   msg=lambda m: f"{column}: {m}")
    # The VAE: Adam moves an entry by about the learning rate whatever its gradient's size, so where a gradient is
    # zero up to rounding (a key projection's bias, a bias right before a GroupNorm) the two runs' last bits give
    # other updates. So the VAE's difference is measured against how far tuning moved it, over all its tensors:
    # within 10% (measured: 3%).
    initial = load_file(data["vae_dir"] / "diffusion_pytorch_model.safetensors")
    a, b = (load_file(out / "tuned" / "vae" / "diffusion_pytorch_model.safetensors")
            for out in (tmp_path / "one", tmp_path / "two"))
    assert a.keys() == b.keys() == initial.keys()
    difference = torch.stack([(b[key] - a[key]).norm() for key in a]).norm()
    moved = torch.stack([(a[key] - initial[key]).norm() for key in a]).norm()
    assert difference <= 0.1 * moved, (difference, moved)
    # The U-Net's LoRA and heads (their LR is 30x the VAE's on this tier: a few entries differ by about one step),
    # each tensor within 1% of its norm (measured: at most 0.1%).
    for name in ("unet/ema/pytorch_lora_weights.safetensors", "unet/align_heads.safetensors"):
        a, b = (load_file(out / "tuned" / name) for out in (tmp_path / "one", tmp_path / "two"))
        assert a.keys() == b.keys()
        for key in a:
            assert (b[key] - a[key]).norm() <= 1e-2 * a[key].norm(), f"{name} {key}"

    # The two-process run as if killed after checkpoint-2, resumed on one process: its state folder carries on.
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed / "train_state" / two.name)
    shutil.rmtree(resumed / "train_state" / two.name / "checkpoints" / f"checkpoint-{STEPS}")
    assert run(data, resumed, unet, tune) == resumed / "train_state" / two.name
    launches = json.loads((resumed / "train_state" / two.name / "run.json").read_text())["launches"]
    assert [(launch["processes"], launch["from_step"]) for launch in launches] == [(2, 0), (1, 2)]
    pd.testing.assert_frame_equal(pd.read_csv(resumed / "tuned" / "train_log.csv").iloc[:2], logs[1].iloc[:2])
    later = pd.read_csv(resumed / "tuned" / "train_log.csv")
    torch.testing.assert_close(torch.tensor(later["loss_vae"].to_numpy()), torch.tensor(logs[0]["loss_vae"].to_numpy()),
                               rtol=1e-3, atol=0)


def test_a_tuning_batch_that_does_not_split_over_the_processes_is_refused_before_launching(data, tmp_path):
    unet, tune = settings()
    with pytest.raises(ValueError, match=r"vae_tune.batch_size 4 does not divide by train.processes 3"):
        launch.train(run_args(data, tmp_path, unet | {"processes": 3}, tune), threads=1, log_path=tmp_path / "log",
                     stage="tune_vae")
    assert not (tmp_path / "log").exists()
    with pytest.raises(ValueError, match="train.processes is 2 but this tuning run has 1 process"):
        run(data, tmp_path, unet | {"processes": 2}, tune)


# -- speed options (config `train`, as train_unet's; tests/test_train.py holds the same checks of its step) ----------

SPEED_OFF = {key: False for key in SPEED_KEYS}
# The logged values computed through D's weights
GAN_TERMS = ("gan", "loss_d", "logits_real", "logits_fake", "grad_norm_d")


def tuning_steps_with(data, unet, tune, run_dir, steps: int) -> tuple[list[dict], dict, dict]:
    """The logged values of a tuner's first `steps` steps; per optimiser (VAE, discriminator, U-Net), its weights
    before and after each step, and the gradients its first step stepped with."""
    tuner = make_tuner(data, run_dir, unet, tune)
    optimised = {"vae": (tuner.vae_optimizer, tuner.vae_params), "d": (tuner.d_optimizer, tuner.d_params),
                 "unet": (tuner.unet_optimizer, tuner.unet_params)}
    grads = {}
    for name, (optimizer, params) in optimised.items():
        def spying_step(*args, name=name, step=optimizer.step, params=params, **kwargs):
            grads.setdefault(name, [None if p.grad is None else p.grad.detach().clone() for p in params])
            return step(*args, **kwargs)

        optimizer.step = spying_step
    weights = {name: [[p.detach().clone() for p in params]] for name, (_, params) in optimised.items()}
    batches, values = iter(tuner.batches(0)), []
    for _ in range(steps):
        values.append(tuner.step(next(batches)))
        for name, (_, params) in optimised.items():
            weights[name].append([p.detach().clone() for p in params])
    return values, weights, grads


def speed_settings_with(**options) -> tuple[dict, dict]:
    """Three steps of all three passes: D alone in the first (its warm-up), the VAE's GAN term from the second."""
    unet, tune = settings(max_steps=8, gan=True, disc_warmup_steps=1)
    return unet | SPEED_OFF | options, tune


@pytest.mark.parametrize("option", ["fused_adamw", "channels_last"])
def test_a_speed_option_leaves_the_tuning_steps_within_float_noise(data, tmp_path, option):
    """Three tuning steps with the option on against three with it off. The first step starts from the same weights:
    its logged values agree within 1e-3 relative, and each optimiser's (clipped) gradients within 2e-2 in relative
    L2 (measured on the CPU with NHWC: the VAE's 1.06e-2, the same with NHWC on the U-Net alone, so through the
    alignment term's backward; its gradient norm 5e-4 relative). fused_adamw changes only the updates: its first
    step is the same bit for bit, and each optimiser's first update is within 1e-4 of its largest. The later steps
    follow updates Adam takes as ~lr x g / (|g| + eps), which turns float noise in a small gradient into a different
    share of lr (see tests/test_train.py): their values agree within 1e-2 relative (1e-5 absolute), except D's: its
    logits start near 0 (~1e-4), and with NHWC its first update alone moved them by 2e-3 (measured), so its terms
    (GAN_TERMS) are compared in the first step only."""
    off_values, off_weights, off_grads = tuning_steps_with(data, *speed_settings_with(), tmp_path / "off", 3)
    on_values, on_weights, on_grads = tuning_steps_with(data, *speed_settings_with(**{option: True}),
                                                        tmp_path / "on", 3)
    assert [on.keys() for on in on_values] == [off.keys() for off in off_values]
    first, later = (dict(rel=1e-3, abs=1e-6), dict(rel=1e-2, abs=1e-5))
    # a channel's latent mean sits near 0 (~5e-3) in latents of std ~1: its later steps are read against that scale
    # (NHWC moved one by 6.7e-5 at step 2 in one full-suite run, measured), not against its own size
    later_mean = dict(rel=1e-2, abs=1e-4)
    apart = {(step + 1, name): (on[name], off[name]) for step, (off, on) in enumerate(zip(off_values, on_values))
             for name in off if (step == 0 or name not in GAN_TERMS)
             and on[name] != pytest.approx(off[name], nan_ok=True, **(
                 first if step == 0 else later_mean if name.startswith("latent_mean_") else later))}
    assert apart == {}
    if option == "fused_adamw":
        assert json.dumps(on_values[0]) == json.dumps(off_values[0])
    assert off_grads.keys() == on_grads.keys() == {"vae", "d", "unet"}
    for name in off_grads:
        assert all(torch.equal(a, b) for a, b in zip(on_weights[name][0], off_weights[name][0]))
        assert [g is None for g in on_grads[name]] == [g is None for g in off_grads[name]], name
        on_flat, off_flat = (torch.cat([g.flatten() for g in grads if g is not None])
                             for grads in (on_grads[name], off_grads[name]))
        assert off_flat.norm() > 0 and (on_flat - off_flat).norm() <= 2e-2 * off_flat.norm(), name
        if option == "fused_adamw":
            off_update = [after - before for after, before in zip(off_weights[name][1], off_weights[name][0])]
            on_update = [after - before for after, before in zip(on_weights[name][1], on_weights[name][0])]
            largest = max(float(u.abs().max()) for u in off_update)
            worst = max(float((a - b).abs().max()) for a, b in zip(on_update, off_update))
            assert largest > 0 and worst <= 1e-4 * largest, (name, worst, largest)


def test_the_cuda_only_speed_options_change_nothing_in_tuning_on_the_cpu_and_say_so(data, tmp_path, caplog):
    """tf32 and pin_memory on the CPU: the same tuning steps bit for bit, and a log line naming each as CUDA only."""
    off_values, off_weights, _ = tuning_steps_with(data, *speed_settings_with(), tmp_path / "off", 2)
    with caplog.at_level(logging.INFO):
        on_values, on_weights, _ = tuning_steps_with(data, *speed_settings_with(tf32=True, pin_memory=True),
                                                     tmp_path / "on", 2)
    assert json.dumps(on_values) == json.dumps(off_values)  # NaN (the terms D's warm-up leaves out) equal too
    for name in off_weights:
        assert all(torch.equal(a, b) for a, b in zip(on_weights[name][-1], off_weights[name][-1])), name
    assert "tf32: CUDA only, no effect on cpu" in caplog.text
    assert "pin_memory: CUDA only, no effect on cpu" in caplog.text
