"""Config validation names the offending key; real tiers fail early on missing paths."""
import copy
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, SCHEMA
from urepa import config as urepa_config


@pytest.fixture
def config():
    return urepa_config.load_yaml(REPO / "config" / "config.yaml")


def test_shipped_config_is_valid(config):
    urepa_config.validate(config, SCHEMA)
    for tier in config["tiers"]:
        for ablation in config["ablations"]:
            urepa_config.train_settings(config, tier, ablation)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(imagenet_dri="/data"), r"'imagenet_dri' is not a known key \(did you mean 'imagenet_dir'\?\)"),
    (lambda c: c["train"].update(lamda=0.5), r"'train.lamda' is not a known key"),
    (lambda c: c["tiers"]["tierA"]["train"].update(max_step=3), r"'tiers.tierA.train.max_step'.*did you mean 'max_steps'"),
    (lambda c: c["ablations"]["token_only"].update(manifold_coef=0), r"'ablations.token_only.manifold_coef'"),
    (lambda c: c["train"].update(batch_size="48"), r"'train.batch_size': '48' is not of type 'integer'"),
    (lambda c: c["train"].update(prediction="x0"), r"'train.prediction'"),
    (lambda c: c["train"].update(align_layers=["middle"]), r"'train.align_layers.0'"),
])
def test_typos_and_wrong_types_are_rejected_by_name(config, mutate, message):
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(urepa_config.ConfigError, match=message):
        urepa_config.validate(broken, SCHEMA)


def test_ablations_override_tier_which_overrides_defaults(config):
    smoke = urepa_config.train_settings(config, "smoke", "token_only")
    assert smoke["manifold_coeff"] == 0 and smoke["align_coeff"] == 0.8
    assert smoke["batch_size"] == config["tiers"]["smoke"]["train"]["batch_size"]
    assert urepa_config.train_settings(config, "tierA", "baseline")["align_coeff"] == 0
    assert urepa_config.train_settings(config, "tierA", "urepa")["learning_rate"] == 2e-4
    config["train"]["finetune"] = "full"
    assert urepa_config.train_settings(config, "tierA", "urepa")["learning_rate"] == 1e-4
    assert urepa_config.train_settings(config, "tierA", "multi_layer")["align_layers"] == ["enc_last", "mid", "dec_first"]
    with pytest.raises(urepa_config.ConfigError, match="unknown ablation 'tokenonly'"):
        urepa_config.train_settings(config, "tierA", "tokenonly")
    with pytest.raises(urepa_config.ConfigError, match="unknown tier 'tierD'"):
        urepa_config.tier_settings(config, "tierD")


@pytest.mark.parametrize("tier", ["tierA", "tierB", "tierC"])
@pytest.mark.parametrize("finetune", ["lora", "partial", "full"])
def test_real_tiers_default_to_epsilon_and_an_uncropped_dinov2_view(config, tier, finetune):
    """SD-1.5 is an epsilon model in every fine-tuning mode; DINOv2 sees the VAE's 512 px square at 224 px
    (16 x 16 tokens), not a resize-256 / crop-224 view."""
    config["train"]["finetune"] = finetune
    for ablation in config["ablations"]:
        assert urepa_config.train_settings(config, tier, ablation)["prediction"] == "epsilon"
    settings = urepa_config.tier_settings(config, tier)
    assert (settings["image_size"], settings["dino_size"]) == (512, 224)
    assert not {"dino_resize", "dino_crop"} & settings.keys()


def test_default_run_compares_urepa_with_baseline_on_the_same_caches(config):
    assert config["compare"] == ["urepa", "baseline"]
    assert config["sample"]["cfg_sweep"] == [1.5, 2.0, 3.0, 4.5, 7.5]
    broken = copy.deepcopy(config)
    broken["tiers"]["smoke"]["compare"] = ["urepa", "basline"]
    with pytest.raises(urepa_config.ConfigError, match=r"'tiers.smoke.compare': unknown ablation 'basline'"):
        urepa_config.validate(broken, SCHEMA)


def _command_line(config, overrides: dict) -> dict:
    """What Snakemake does with --config: YAML's BaseLoader (every scalar a string), merged in depth."""
    from snakemake.utils import update_config

    command_line = {key: yaml.load(value, Loader=yaml.BaseLoader) for key, value in overrides.items()}
    update_config(config, command_line)
    urepa_config.apply_command_line(config, command_line, SCHEMA)
    return config


def test_nested_command_line_values_are_typed_by_the_schema_and_win(config):
    config["tiers"]["tierA"]["train"]["max_steps"] = 60000
    config["ablations"]["urepa"] = {"max_steps": 7}
    _command_line(config, {"train": "{max_steps: 500, snr_gamma: 5.0, learning_rate: null, "
                                    "gradient_checkpointing: true, align_schedule: {kind: cosine}}",
                           "tiers": "{tierA: {images_per_class: 100}, smoke: {compare: [urepa, token_only]}}"})
    urepa_config.validate(config, SCHEMA)
    assert urepa_config.tier_settings(config, "tierA")["images_per_class"] == 100
    assert urepa_config.tier_settings(config, "tierA")["val_images_per_class"] == 10  # the rest of the tier stays
    assert config["tiers"]["smoke"]["compare"] == ["urepa", "token_only"]
    for tier in ("smoke", "tierA"):  # the tier's and the ablation's max_steps no longer win over the command line
        settings = urepa_config.train_settings(config, tier, "urepa")
        assert settings["max_steps"] == 500 and settings["snr_gamma"] == 5.0
        assert settings["align_schedule"]["kind"] == "cosine" and settings["gradient_checkpointing"] is True
    # Other tier settings and other ablations' presets are left alone.
    assert urepa_config.train_settings(config, "smoke", "baseline")["align_coeff"] == 0
    assert urepa_config.train_settings(config, "smoke", "urepa")["batch_size"] == 8


def test_a_tier_value_on_the_command_line_beats_the_global_one(config):
    _command_line(config, {"train": "{max_steps: 500}", "tiers": "{smoke: {train: {max_steps: 50}}}"})
    assert urepa_config.train_settings(config, "smoke", "urepa")["max_steps"] == 50
    assert urepa_config.train_settings(config, "tierA", "urepa")["max_steps"] == 500


@pytest.mark.parametrize("overrides, message", [
    ({"train": "{max_stepz: 5}"}, r"'train.max_stepz' is not a known key \(did you mean 'max_steps'\?\)"),
    ({"train": "{max_steps: many}"}, r"'train.max_steps': 'many' is not of type 'integer'"),
    ({"tiers": "{tierA: {images_per_class: -3}}"}, r"'tiers.tierA.images_per_class': -3 is less than the minimum"),
])
def test_bad_command_line_values_are_named(config, overrides, message):
    with pytest.raises(urepa_config.ConfigError, match=message):
        urepa_config.validate(_command_line(config, overrides), SCHEMA)


def test_snakemake_takes_nested_overrides_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config",
                             "train={max_steps: 50}", "tiers={smoke: {train: {eval_interval: 25}}}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for step in (25, 50):
        assert f"curve/step-{step:07d}" in result.stdout
    assert "curve/step-0000040" not in result.stdout


def test_tier_c_reuses_tier_b_data(config):
    assert urepa_config.data_tier(config, "tierC") == "tierB"
    assert urepa_config.data_tier(config, "tierA") == "tierA"


def test_missing_real_paths_are_named(config, tmp_path):
    config.update(imagenet_dir="/nonexistent/ilsvrc", sd15_dir=str(tmp_path), dinov2=None)
    with pytest.raises(urepa_config.ConfigError) as error:
        urepa_config.check_real_paths(config, "tierB")
    text = str(error.value)
    assert "'/nonexistent/ilsvrc' does not exist" in text and "'dinov2' is not set" in text
    urepa_config.check_real_paths(config, "smoke")  # the smoke tier builds its own inputs


def test_incomplete_real_inputs_are_named_before_any_job(config, tmp_path):
    (tmp_path / "ilsvrc").mkdir()
    (tmp_path / "sd15" / "unet").mkdir(parents=True)
    (tmp_path / "sd15" / "vae").mkdir()
    (tmp_path / "dinov2").mkdir()
    config.update(imagenet_dir=str(tmp_path / "ilsvrc"), sd15_dir=str(tmp_path / "sd15"),
                  dinov2=str(tmp_path / "dinov2"), inception_dir=str(tmp_path))
    with pytest.raises(urepa_config.ConfigError) as error:
        urepa_config.check_real_paths(config, "tierA")
    text = str(error.value)
    assert "has no Data/CLS-LOC/train folder" in text
    assert "lacks text_encoder/, tokenizer/, scheduler/" in text
    assert "'dinov2'" in text and "neither a folder with config.json nor a .pth file" in text
    assert "inception-2015-12-05.pt" in text


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b"<html>404 Not Found</html>"), "is not a readable PyTorch checkpoint"),
    (lambda p: __import__("torch").save({"state_dict": {}}, p), "is a PyTorch file but holds no DINOv2 weights"),
])
def test_a_file_named_like_a_dinov2_checkpoint_is_opened_before_any_job(config, tmp_path, make, problem):
    """A download that saved an error page (or another model) as dinov2_vitl14_pretrain.pth fails at once."""
    fake = tmp_path / "dinov2_vitl14_pretrain.pth"
    make(fake)
    config.update(dinov2=str(fake))
    with pytest.raises(urepa_config.ConfigError) as error:
        urepa_config.check_real_paths(config, "tierA")
    assert f"config key 'dinov2': '{fake}' {problem}" in str(error.value)


def test_a_dinov2_folder_of_another_model_is_named(config, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "vit"}')
    config.update(dinov2=str(tmp_path))
    with pytest.raises(urepa_config.ConfigError, match="model_type 'vit', not a DINOv2"):
        urepa_config.check_real_paths(config, "tierA")


def test_snakemake_dry_run_names_the_missing_path(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", "tier=tierB",
         "imagenet_dir=/nonexistent", f"sd15_dir={tmp_path}", f"dinov2={tmp_path}"],
        cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "imagenet_dir" in result.stderr + result.stdout and "/nonexistent" in result.stderr + result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_snakemake_dry_run_rejects_a_config_typo():
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--config", "tire=tierA"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode != 0
    assert "'tire' is not a known key (did you mean 'tier'?)" in result.stdout + result.stderr


# -- the VAE as a setting -------------------------------------------------------------------------------------


def test_an_unknown_vae_name_is_refused_naming_the_key(config):
    config["ablations"]["urepa"] = {"vae": "e2e-typo"}
    config["sample"]["decode_vae"] = "other"
    with pytest.raises(urepa_config.ConfigError) as error:
        urepa_config.validate(config, SCHEMA)
    text = str(error.value)
    assert "config key 'ablations.urepa.vae': unknown VAE 'e2e-typo'; known VAEs: sd15, e2e" in text
    assert "config key 'sample.decode_vae': unknown VAE 'other'" in text


def test_a_tiers_vaes_are_those_of_the_runs_it_compares(config):
    assert urepa_config.tier_vaes(config, "smoke") == ["sd15"]
    config["ablation"] = "e2e_vae"
    assert urepa_config.tier_vaes(config, "smoke") == ["sd15", "e2e"]
    assert urepa_config.train_settings(config, "smoke", "e2e_vae_baseline")["vae"] == "e2e"
    assert urepa_config.train_settings(config, "smoke", "e2e_vae_baseline")["align_coeff"] == 0.0


def real_inputs(config, tmp_path):
    """A real tier's inputs that pass every check but the VAEs'."""
    ilsvrc = tmp_path / "ilsvrc" / "Data" / "CLS-LOC" / "train"
    ilsvrc.mkdir(parents=True)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / "sd15" / name).mkdir(parents=True)
    (tmp_path / "dinov2").mkdir()
    (tmp_path / "dinov2" / "config.json").write_text('{"model_type": "dinov2"}')
    (tmp_path / "inception-2015-12-05.pt").write_bytes(b"")
    (tmp_path / "vgg16-397923af.pth").write_bytes(b"")
    config.update(imagenet_dir=str(tmp_path / "ilsvrc"), sd15_dir=str(tmp_path / "sd15"),
                  dinov2=str(tmp_path / "dinov2"), inception_dir=str(tmp_path),
                  vgg16=str(tmp_path / "vgg16-397923af.pth"))


def test_a_real_tier_names_an_unset_or_wrong_vae_before_any_job(config, tmp_path):
    real_inputs(config, tmp_path)
    urepa_config.check_real_paths(config, "tierA")  # sd15 only: nothing else to check
    config["ablation"] = "e2e_vae"
    with pytest.raises(urepa_config.ConfigError, match="config key 'vaes.e2e' is not set; tier 'tierA' trains on"):
        urepa_config.check_real_paths(config, "tierA")
    config["vaes"]["e2e"] = str(tmp_path / "sd15")  # a pipeline folder, not an AutoencoderKL
    with pytest.raises(urepa_config.ConfigError, match=r"config key 'vaes.e2e': .*sd15 is not a diffusers "
                                                       r"AutoencoderKL folder"):
        urepa_config.check_real_paths(config, "tierA")


def test_a_real_tier_needs_the_vgg16_weights_of_lpips(config, tmp_path):
    real_inputs(config, tmp_path)
    config["vgg16"] = None
    with pytest.raises(urepa_config.ConfigError,
                       match=r"config key 'vgg16': LPIPS \(recon_eval, tune_vae\) needs .* it is not set"):
        urepa_config.check_real_paths(config, "tierA")


def planned_jobs(tmp_path, setting: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """`snakemake -n --config <setting>` in `tmp_path` with the project's config: the run, and its job count per
    rule."""
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "-d", str(tmp_path),
                             "-s", str(REPO / "Snakefile"), "--config", setting], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return result, dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.MULTILINE))


def test_one_more_vae_plans_one_more_latent_cache_and_shares_the_others(tmp_path):
    """`--config ablation=e2e_vae`: the e2e VAE is generated, gets its own latent cache and reconstruction report;
    the DINOv2 and CLIP caches stay one each, shared by the runs of both VAEs."""
    result, counts = planned_jobs(tmp_path, "ablation=e2e_vae")
    assert {k: counts[k] for k in ("generated_vae", "cache_vae", "cache_dino", "cache_clip", "recon_eval",
                                   "train_unet")} == {"generated_vae": "1", "cache_vae": "2", "cache_dino": "1",
                                                      "cache_clip": "1", "recon_eval": "2", "train_unet": "3"}
    for path in ("results/smoke/cache/sd15/vae_latents.zarr", "results/smoke/cache/e2e/vae_latents.zarr",
                 "results/smoke/vae/e2e/recon.json", "results/smoke/inputs/vaes/e2e"):
        assert path in result.stdout


# -- REPA-E, part 2: VAEs tuned by the workflow ---------------------------------------------------------------


def test_tuned_vaes_are_known_vae_names_with_settings_per_tier_and_preset(config):
    urepa_config.validate(config, SCHEMA)  # recon_vae, repae, repae_baseline name tuned VAEs
    assert urepa_config.tuned_vaes(config) == ["repae", "recon"]
    repae, recon = (urepa_config.tune_settings(config, "smoke", name) for name in ("repae", "recon"))
    assert repae["vae_align_coeff"] == 1.5 and recon["vae_align_coeff"] == 0.0
    assert repae["max_steps"] == config["tiers"]["smoke"]["vae_tune"]["max_steps"]  # the tier's override
    assert urepa_config.tune_settings(config, "tierA", "repae")["vae_learning_rate"] == 1e-5
    unet = urepa_config.tune_unet_settings(config, "smoke", "repae")
    assert unet["vae"] == "sd15" and unet["max_steps"] == repae["max_steps"] and unet["batch_size"] == 4
    assert unet["align_coeff"] == urepa_config.train_settings(config, "smoke", "urepa")["align_coeff"]


def test_a_joint_row_must_train_on_the_vae_it_was_tuned_beside(config):
    config["ablations"]["repae_joint"] = {"vae": "recon"}
    config["vae_tune"]["joint_ablations"]["typo_joint"] = "repae"
    with pytest.raises(urepa_config.ConfigError) as error:
        urepa_config.validate(config, SCHEMA)
    assert "'ablations.repae_joint.vae' must be 'repae'" in str(error.value)
    assert "'vae_tune.joint_ablations.typo_joint': needs an ablation 'typo_joint'" in str(error.value)


def test_a_tuned_vae_may_not_also_be_a_vaes_entry(config):
    config["vaes"]["repae"] = "/models/repae"
    with pytest.raises(urepa_config.ConfigError, match="both define repae"):
        urepa_config.validate(config, SCHEMA)


def test_a_real_tier_asks_no_folder_for_a_tuned_vae(config, tmp_path):
    real_inputs(config, tmp_path)
    config["ablation"] = "repae"
    urepa_config.check_real_paths(config, "tierA")  # made by tune_vae, not a config path


def test_the_repae_rows_plan_two_tunings_two_latent_caches_and_nothing_else_twice(tmp_path):
    """recon_vae, repae, repae_baseline and repae_joint beside urepa and baseline: tune_vae once per tuned VAE, one
    latent cache each (the sd15 one shared), one DINOv2 and CLIP cache, a reconstruction report per VAE; the joint
    row's U-Net comes from the tuning run (no train_unet job) and its curve has the final point only."""
    result, counts = planned_jobs(tmp_path, "compare=[urepa,baseline,recon_vae,repae,repae_baseline,repae_joint]")
    assert {k: counts[k] for k in ("tune_vae", "cache_vae", "cache_dino", "cache_clip", "recon_eval", "train_unet",
                                   "joint_unet")} == {"tune_vae": "2", "cache_vae": "3", "cache_dino": "1",
                                                      "cache_clip": "1", "recon_eval": "3", "train_unet": "5",
                                                      "joint_unet": "1"}
    assert "results/smoke/repae_joint/seed-0/curve/step-0000012" in result.stdout
    for path in ("results/smoke/vae/repae/tuned", "results/smoke/vae/recon/tuned",
                 "results/smoke/cache/repae/vae_latents.zarr", "results/smoke/vae/recon/recon.json"):
        assert path in result.stdout


# -- the REPA family's variants as presets ----------------------------------------------------------------------


def differing(config, tier: str, ablation: str) -> dict:
    """The settings in which `ablation` differs from `urepa` on `tier`, as (urepa's, the ablation's)."""
    urepa, other = (urepa_config.train_settings(config, tier, name) for name in ("urepa", ablation))
    flat = lambda s: {**{k: v for k, v in s.items() if k != "align_schedule"},  # noqa: E731
                      **{f"align_schedule.{k}": v for k, v in s["align_schedule"].items()}}
    urepa, other = flat(urepa), flat(other)
    return {key: (urepa[key], other[key]) for key in urepa if urepa[key] != other[key]}


def test_each_variant_changes_only_what_its_method_changes(config):
    urepa_config.validate(config, SCHEMA)
    assert differing(config, "smoke", "irepa") == {"projector": ("mlp", "conv3x3"), "target_spatial_norm": (None, 0.6)}
    assert differing(config, "smoke", "haste") == {"align_schedule.cutoff_step": (None, 60)}  # half of smoke's 120
    assert differing(config, "smoke", "token_manifold") == {"manifold_mode": ("sample", "token")}
    assert "cutoff_fraction" not in urepa_config.train_settings(config, "smoke", "haste")["align_schedule"]


@pytest.mark.parametrize("tier, cutoff", [("smoke", 60), ("rehearsal", 1), ("tierA", 30000), ("tierB", 60000),
                                          ("tierC", 100000)])
def test_the_haste_cutoff_is_a_share_of_each_tiers_own_steps(config, tier, cutoff):
    assert urepa_config.train_settings(config, tier, "haste")["align_schedule"]["cutoff_step"] == cutoff
    config["ablations"]["haste"]["align_schedule"]["cutoff_fraction"] = 0.4  # round(0.4 x 60000): 24000, not 24001
    assert urepa_config.train_settings(config, "tierA", "haste")["align_schedule"]["cutoff_step"] == 24000


def test_a_cutoff_by_step_and_by_share_at_once_is_refused_naming_both(config):
    config["tiers"]["smoke"]["train"]["align_schedule"] = {"cutoff_step": 30}
    with pytest.raises(urepa_config.ConfigError, match=r"'train.align_schedule.cutoff_step' \(30\) and "
                                                       r"'train.align_schedule.cutoff_fraction' \(0.5\) are both set "
                                                       r"for ablation 'haste' on tier 'smoke'"):
        urepa_config.train_settings(config, "smoke", "haste")
    assert urepa_config.train_settings(config, "smoke", "urepa")["align_schedule"]["cutoff_step"] == 30


def test_full_spatial_normalisation_with_the_sample_gram_is_refused(config):
    """alpha = 1 zeroes each channel's mean over the image: the sample-mode Gram of pooled targets is noise."""
    config["ablations"]["irepa"]["target_spatial_norm"] = 1.0
    with pytest.raises(urepa_config.ConfigError, match="'train.target_spatial_norm' is 1 with manifold_mode 'sample'"):
        urepa_config.train_settings(config, "smoke", "irepa")
    config["ablations"]["irepa"]["manifold_mode"] = "token"
    assert urepa_config.train_settings(config, "smoke", "irepa")["target_spatial_norm"] == 1.0


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["ablations"]["irepa"].update(projector="conv5x5"), "'ablations.irepa.projector'"),
    (lambda c: c["ablations"]["irepa"].update(target_spatial_norm=1.5), "'ablations.irepa.target_spatial_norm'"),
    (lambda c: c["ablations"]["haste"]["align_schedule"].update(cutoff_fraction=0),
     "'ablations.haste.align_schedule.cutoff_fraction'"),
])
def test_variant_settings_out_of_range_are_named(config, mutate, message):
    mutate(config)
    with pytest.raises(urepa_config.ConfigError, match=re.escape(message)):
        urepa_config.validate(config, SCHEMA)


def test_the_variants_plan_one_training_each_on_the_shared_caches(tmp_path):
    """`compare=[urepa,baseline,irepa,haste,token_manifold]`: five trainings, each with its sample set, curve,
    analyses and report row (and the pretrained model's final set, once); one set of caches for all."""
    result, counts = planned_jobs(tmp_path, "compare=[urepa,baseline,irepa,haste,token_manifold]")
    assert {k: counts[k] for k in ("train_unet", "metrics", "alignment", "cache_dino", "cache_clip", "report")} == {
        "train_unet": "5", "metrics": "6", "alignment": "5", "cache_dino": "1", "cache_clip": "1", "report": "1"}
    for ablation in ("irepa", "haste", "token_manifold"):
        assert f"results/smoke/{ablation}/seed-0/model" in result.stdout


def test_the_speed_options_travel_as_one_resource_and_stay_out_of_the_run_identity():
    """Every combination of speed options survives the `speed` resource's round trip; an unknown name is refused
    naming the resource; none of them is in the settings a run's identity and the train rule's params hold."""
    keys = urepa_config.SPEED_KEYS
    for mask in range(2 ** len(keys)):
        settings = {key: bool(mask >> n & 1) for n, key in enumerate(keys)}
        assert urepa_config.speed_settings(urepa_config.speed_resource(settings)) == settings
    assert urepa_config.speed_resource(dict.fromkeys(keys, False)) == "none"
    with pytest.raises(urepa_config.ConfigError, match="resource 'speed'.*'turbo'"):
        urepa_config.speed_settings("tf32+turbo")
    config = urepa_config.load_yaml(REPO / "config" / "config.yaml")
    settings = urepa_config.train_settings(config, "tierA", "urepa")
    assert set(keys) <= set(settings) and not set(keys) & set(urepa_config.without_launch(settings))


# -- the pretrained model (SD-1.5 as it is) and the same-noise grid --------------------------------------------


def test_pretrained_is_refused_as_an_ablation_name(config):
    config["ablations"]["pretrained"] = {"align_coeff": 0.0}
    with pytest.raises(urepa_config.ConfigError, match=r"config key 'ablations.pretrained': 'pretrained' is the name "
                                                       r"of SD-1.5 as it is"):
        urepa_config.validate(config, SCHEMA)


def test_the_default_run_samples_the_pretrained_model_once_at_the_chosen_seed_and_draws_the_grid(tmp_path):
    """The default smoke targets: one weights folder of SD-1.5 as it is (rule pretrained_model, never train_unet), its
    final set, CFG sweep and step-0 curve point at the chosen seed (so its noise is that seed's runs'), each
    run's curve starting at that point, and the comparison grid."""
    result, counts = planned_jobs(tmp_path, "seed=3")
    assert {k: counts[k] for k in ("pretrained_model", "comparison_grid", "train_unet", "fid_curve", "cfg_sweep")} == {
        "pretrained_model": "1", "comparison_grid": "1", "train_unet": "4", "fid_curve": "4", "cfg_sweep": "5"}
    run = "results/smoke/pretrained/seed-3"
    for path in (f"{run}/model", f"{run}/samples", f"{run}/metrics.json", f"{run}/cfg_sweep/cfg-1.5/samples",
                 f"{run}/cfg_sweep.json", f"{run}/curve/step-0000000/metrics.json", "results/smoke/comparison_grid.png"):
        assert path in result.stdout
    assert "pretrained/seed-0" not in result.stdout and "pretrained/seed-3/fid_curve.json" not in result.stdout
    assert re.findall(r"rule (\w+):\n    input: [^\n]*\n    output: " + f"{run}/model\n", result.stdout) == [
        "pretrained_model"]
    curve_inputs = re.findall(r"rule fid_curve:\n    input: ([^\n]*)", result.stdout)
    assert len(curve_inputs) == 4 and all(
        inputs.startswith(f"{run}/curve/step-0000000/metrics.json, ") for inputs in curve_inputs)
    # the grid: the pretrained model beside each compared ablation, all at the chosen seed
    assert re.findall(r"rule comparison_grid:\n    input: ([^\n]*)", result.stdout) == [
        f"{run}/samples, results/smoke/urepa/seed-3/samples, results/smoke/baseline/seed-3/samples, "
        "results/smoke/classes.csv"]


def test_the_cfg_sweep_point_at_the_curve_samplers_scale_is_the_last_curve_point(tmp_path):
    """At the curve preset's own guidance scale (7.5) a run's sweep point and its last FID-vs-step point are the same
    images (final EMA = last snapshot, same sampler, noise and count): the sweep reads that point, and no cfg-7.5
    set is drawn; the other scale (1.5) is drawn as before."""
    result, counts = planned_jobs(tmp_path, "seed=0")
    assert "cfg_sweep/cfg-7.5" not in result.stdout
    sweep_inputs = dict(re.findall(r"rule cfg_sweep:\n    input: ([^\n]*)\n    output: ([^\n]*)", result.stdout))
    assert {output: inputs.split(", ") for inputs, output in sweep_inputs.items()} == {
        f"results/smoke/{run}/cfg_sweep.json": [f"results/smoke/{run}/cfg_sweep/cfg-1.5/metrics.json",
                                                f"results/smoke/{run}/curve/step-{last:07d}/metrics.json"]
        for run, last in (("urepa/seed-0", 120), ("baseline/seed-0", 120), ("pretrained/seed-0", 0))}
