"""The workflow as a whole: one invocation per results folder, the jobs and outputs it plans, and the
inputs its rules hand to the stages."""
import fcntl
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import yaml

from conftest import REPO
from urepa.runtime import RESULTS_LOCK


def snakemake(workdir, *args):
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--cores", "1", *args], capture_output=True, text=True, timeout=600)


def test_a_second_invocation_stops_at_once_and_deletes_nothing(tmp_path):
    """While one invocation holds the results folder, another that would rebuild a finished output (here a
    forced rerun of the smoke tree) stops before any job, with a message, and the output is untouched."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    finished = tmp_path / "results" / "smoke" / "inputs" / "imagenet"
    finished.mkdir(parents=True)
    (finished / "finished.txt").write_text("hours of work")
    with open(tmp_path / "results" / RESULTS_LOCK, "a+") as running:
        running.write("pid 4242 on gpu-node-7, since 2026-11-23 09:00:00\n")
        running.flush()
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the first invocation holds
        second = snakemake(tmp_path, "results/smoke/inputs/imagenet", "--forcerun", "generated_imagenet")
    assert second.returncode != 0
    output = second.stdout + second.stderr
    assert "in use by another snakemake invocation (pid 4242 on gpu-node-7" in output
    assert "Nothing was started or deleted" in output
    assert (finished / "finished.txt").read_text() == "hours of work"
    # The lock dies with its holder: the next invocation runs.
    third = snakemake(tmp_path, "results/smoke/inputs/imagenet", "--forcerun", "generated_imagenet")
    assert third.returncode == 0, third.stderr[-2000:]
    assert (finished / "Data" / "CLS-LOC" / "train").is_dir()


def _planned_outputs(workdir, *args):
    """The outputs a dry run would build, from Snakemake's job listing."""
    run = snakemake(workdir, "-n", *args)
    assert run.returncode == 0, run.stderr[-2000:]
    return {path for line in run.stdout.splitlines() if "output:" in line
            for path in line.split("output:", 1)[1].strip().split(", ")}


def test_seeds_are_part_of_every_runs_path_and_coexist(tmp_path):
    """`--config seed=7` adds seed 7's runs of every compared ablation beside seed 0's (each its own training,
    samples and analyses), `seeds=[...]` lists several; data jobs stay shared by all seeds."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    with_seed = _planned_outputs(tmp_path, "--config", "seed=7")
    for ablation in ("urepa", "baseline"):
        for output in ("model", "metrics.json", "alignment.json", "cfg_sweep.json", "fid_curve.json"):
            assert f"results/smoke/{ablation}/seed-0/{output}" in with_seed
            assert f"results/smoke/{ablation}/seed-7/{output}" in with_seed
    seed_0 = {o for o in with_seed if "seed-0" in o}
    # SD-1.5 as it is: once, at the chosen seed (its noise is that seed's runs'), shared by both seeds' curves
    pretrained = {o for o in with_seed if "/pretrained/seed-" in o}
    assert pretrained and all("/pretrained/seed-7/" in o for o in pretrained)
    assert {o for o in with_seed if "seed-7" in o} - pretrained == {o.replace("seed-0", "seed-7") for o in seed_0}
    three = _planned_outputs(tmp_path, "--config", "seeds=[0, 1, 2]")
    assert {o for o in three if o.endswith("/model")} == {
        f"results/smoke/{a}/seed-{s}/model" for a in ("urepa", "baseline") for s in (0, 1, 2)} | {
        "results/smoke/pretrained/seed-0/model"}
    assert "results/smoke/subset.csv" in three and not any("seed-" in o for o in three if "/cache/" in o)


def test_the_workflow_passes_snakemakes_linter(tmp_path):
    shutil.copytree(REPO / "config", tmp_path / "config")
    lint = snakemake(tmp_path, "--lint")
    assert lint.returncode == 0 and "Congratulations, your workflow is in a good condition" in lint.stderr, \
        lint.stderr[-3000:]


def test_a_nested_command_line_setting_wins_over_the_tiers(tmp_path):
    """`--config 'train={max_steps: 70}'` (Snakemake refuses dotted keys) reaches every run although the smoke
    tier sets max_steps: 120: the FID-vs-step points are steps 60 (its eval_interval) and 70, after the pretrained
    model's step 0."""
    shutil.copytree(REPO / "config", tmp_path / "config")
    planned = _planned_outputs(tmp_path, "--config", "train={max_steps: 70}")
    steps = {o.split("/curve/")[1].split("/")[0] for o in planned if "/curve/step-" in o}
    assert steps == {"step-0000000", "step-0000060", "step-0000070"}


# -- the cache rules ------------------------------------------------------------------------------------


def dry_run(tmp_path: Path, smoke_cache: dict) -> subprocess.CompletedProcess:
    """`snakemake -n` of the smoke tier's image caches, with `smoke_cache` as the tier's `cache` settings."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["tiers"]["smoke"]["cache"] = smoke_cache
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "--cores", "1", "-n", "results/smoke/cache/sd15/vae_latents.zarr",
                           "results/smoke/cache/dino_tokens.zarr"], capture_output=True, text=True, timeout=600)


def test_cache_shards_splits_each_image_cache_into_part_jobs_and_a_sealing_job(tmp_path):
    planned = dry_run(tmp_path, {"shards": 3, "shard_rows": 32})
    assert planned.returncode == 0, planned.stderr[-2000:]
    for name in ("sd15/vae_latents", "dino_tokens"):
        for part in range(3):
            assert f"results/smoke/cache/{name}.parts/{part}-of-3.json" in planned.stdout
        assert f"results/smoke/cache/{name}.parts/3-of-3.json" not in planned.stdout
    counts = dict(re.findall(r"^(cache_\w+)\s+(\d+)$", planned.stdout, flags=re.MULTILINE))
    assert counts == {"cache_vae_part": "3", "cache_dino_part": "3", "cache_vae": "1", "cache_dino": "1"}

    refused = dry_run(tmp_path, {"shard_rows": 48})
    assert refused.returncode != 0
    assert "cache.shard_rows (48) must be a positive multiple of cache.batch_size (32)" in refused.stdout + refused.stderr


# -- the sampling rules ---------------------------------------------------------------------------------


def test_sample_sets_are_drawn_from_the_ema_weights(tmp_path, monkeypatch):
    """The final set and every CFG-sweep point load the run's EMA export; FID-vs-step points its EMA
    snapshots; the pretrained model's sets its one folder. Read from the rules as Snakemake loads them, for one
    job's wildcards."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    shutil.copytree(REPO / "config", tmp_path / "config")
    monkeypatch.chdir(tmp_path)  # Snakemake enters the workdir; the test's teardown leaves it
    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=REPO / "Snakefile",
                                workdir=tmp_path)._workflow

        def weights(sample_set: str, ablation: str = "urepa") -> tuple[str, str]:
            """(weights folder, model folder) of a sampling job of the sample set."""
            rule = workflow.get_rule("sample_shard")
            values = {name: "x" for name in rule.wildcard_names}
            values.update(tier="smoke", ablation=ablation, seed="0", set=sample_set, shard="0", shards="1")
            param = rule.params["weights"]
            folder = param(types.SimpleNamespace(**values)) if callable(param) else param.format(**values)
            return folder, rule.input["model"].format(**values)

        folder, model = weights("final")
        assert folder == f"{model}/ema"
        folder, model = weights("cfg_sweep/cfg-1.5")
        assert folder == f"{model}/ema"
        folder, model = weights("curve/step-40")
        assert folder == f"{model}/snapshots/step-0000040"
        # SD-1.5 as it is: its one folder (no EMA, no snapshots) for every set, and SD-1.5's VAE
        for sample_set in ("final", "cfg_sweep/cfg-1.5", "curve/step-0"):
            folder, model = weights(sample_set, "pretrained")
            assert folder == model == "results/smoke/pretrained/seed-0/model"


# -- params and resources ---------------------------------------------------------------------------------------


def rule_settings(tmp_path: Path, monkeypatch, config_overrides: dict) -> dict:
    """{rule: (params, resources)} of every rule that runs a model, as Snakemake evaluates them for one job of the
    smoke tier, under config.yaml with `config_overrides` applied."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ResourceSettings

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    for key, value in config_overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (tmp_path / "config").mkdir(parents=True)
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    wildcards = types.SimpleNamespace(tier="smoke", ablation="urepa", seed="0", set="final", shard="0", shards="1",
                                      part="0", parts="1", point="curve/step-0000040", vae="sd15")
    found = {}
    with SnakemakeApi() as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1), snakefile=REPO / "Snakefile",
                                workdir=tmp_path)._workflow
        for name in ("cache_vae_part", "cache_dino_part", "cache_clip", "train_unet", "sample_shard", "reference_stats",
                     "metrics", "point_metrics", "alignment", "recon_eval", "probe", "probe_references"):
            rule = workflow.get_rule(name)
            params = {key: value(wildcards) if callable(value) else value for key, value in rule.params.items()}
            resources = {key: value.evaluate(wildcards).value for key, value in rule.resources.items()
                         if key in ("device", "data_workers", "processes", "grad_accum", "report_to", "speed")}
            found[name] = (params, resources)
    return found


def test_how_a_job_runs_is_in_its_resources_and_changes_no_params(tmp_path, monkeypatch):
    """Device, data workers, training processes, gradient accumulation and the tracker change no result: they
    reach the scripts as resources, so changing them changes no rule's params (Snakemake reruns a job whose
    params changed). What a job computes from does change them. No script reads snakemake.config."""
    default = rule_settings(tmp_path / "default", monkeypatch, {})
    moved = rule_settings(tmp_path / "moved", monkeypatch, {"device": "cpu", "num_workers": 0, "report_to": "none",
                                                            "train": {"processes": 2, "grad_accum": 2, "compile": True,
                                                                      "tf32": False}})
    for name, (params, resources) in default.items():
        assert moved[name][0] == params, name
        assert resources["device"] == "auto" and moved[name][1]["device"] == "cpu", name
        assert resources["data_workers"] == 2 and moved[name][1]["data_workers"] == 0, name
    assert default["train_unet"][1] == {"device": "auto", "data_workers": 2, "processes": 1, "grad_accum": 1,
                                        "report_to": "tensorboard", "speed": "tf32+fused_adamw+pin_memory"}
    assert moved["train_unet"][1] == {"device": "cpu", "data_workers": 0, "processes": 2, "grad_accum": 2,
                                      "report_to": "none", "speed": "fused_adamw+compile+pin_memory"}
    batch = rule_settings(tmp_path / "batch", monkeypatch, {"sample": {"batch_size": 3}, "evaluate": {"batch_size": 5}})
    assert batch["sample_shard"][0]["batch_size"] == 3
    evaluating = ("reference_stats", "metrics", "point_metrics", "alignment", "probe", "probe_references")
    assert {batch[name][0]["batch_size"] for name in evaluating} == {5}
    for script in (REPO / "workflow" / "scripts").glob("*.py"):
        assert "snakemake.config" not in script.read_text(), script.name


def test_every_script_runs_on_its_rules_threads():
    """Each job sets torch's, the BLAS and the OpenMP threads to its rule's `threads` (urepa.runtime.set_threads;
    tests/test_runtime.py), or hands them to the launcher, which shares them out among its processes."""
    for script in (REPO / "workflow" / "scripts").glob("*.py"):
        text = script.read_text()
        assert "set_threads(snakemake.threads)" in text or "snakemake.threads, snakemake.log[0]" in text, script.name
