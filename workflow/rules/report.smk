# Stage 6: the tier's comparison of ablations: fid.json and a self-contained report.html; the summary over tiers.
from urepa import summary as urepa_summary


rule fid_summary:
    input:
        # "loss_curve" is the run's model folder: its train_log.csv and launches give the training cost.
        runs=lambda w: run_files(w.tier, "metrics", "cfg_sweep", "curve", "loss_curve"),
        pretrained=lambda w: [pretrained_outputs(w.tier)[key] for key in ("metrics", "cfg_sweep")],
    output:
        "results/{tier}/fid.json",
    params:
        runs=lambda w: run_outputs(w.tier),
        pretrained=lambda w: pretrained_outputs(w.tier),
        seed=config["seed"],
        target_fid=config["evaluate"]["target_fid"],
    log:
        "results/{tier}/logs/fid_summary.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/fid_summary.py"


rule report:
    input:
        fid="results/{tier}/fid.json",
        runs=lambda w: run_files(w.tier),
        recon=lambda w: [f"results/{w.tier}/vae/{vae}/recon.json" for vae in urepa_config.tier_vaes(config, w.tier)],
        probe_pretrained="results/{tier}/pretrained/probe.json",
        probe_dinov2="results/{tier}/dinov2/probe.json",
        pretrained_sweep=lambda w: pretrained_outputs(w.tier)["cfg_sweep"],
        comparison_grid="results/{tier}/comparison_grid.png",
    output:
        html=report("results/{tier}/report.html", caption="../report/report_page.rst", category="Summary"),
        curves=report("results/{tier}/fid_curve.png", caption="../report/fid_curve.rst", category="FID vs step"),
        sweep=report("results/{tier}/cfg_sweep.png", caption="../report/cfg_sweep.rst", category="CFG sweep"),
    params:
        runs=lambda w: run_outputs(w.tier),
        vaes=lambda w: {a: urepa_config.train_settings(config, w.tier, a)["vae"] for a in compared(w.tier)},
        settings=lambda w: {a: urepa_config.without_launch(urepa_config.train_settings(config, w.tier, a))
                            for a in compared(w.tier)},
        target_fid=config["evaluate"]["target_fid"],
        tier_source=lambda w: tier_of(w)["source"],
    log:
        "results/{tier}/logs/report.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/report.py"


rule comparison_grid:
    # Same-noise comparison: image i of every final set starts from the same noise (the chosen seed's) and prompt.
    input:
        pretrained=lambda w: pretrained_outputs(w.tier)["samples"],
        runs=lambda w: [f"results/{w.tier}/{a}/seed-{config['seed']}/samples" for a in compared(w.tier)],
        classes=lambda w: cache_paths(w.tier)["classes"],
    output:
        report("results/{tier}/comparison_grid.png", caption="../report/comparison_grid.rst", category="Samples"),
    params:
        columns=lambda w: [urepa_config.PRETRAINED, *compared(w.tier)],
        rows=config["sample"]["comparison_grid_classes"],
    log:
        "results/{tier}/logs/comparison_grid.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/comparison_grid.py"


rule summary:
    # results/summary.html: every tier with results beside the one being run (config summary_tiers; README).
    input:
        fid=f"results/{TIER}/fid.json",
        report=f"results/{TIER}/report.html",
    output:
        "results/summary.html",
    params:
        tiers=urepa_summary.tiers_with_results("results", config.get("summary_tiers"), TIER),
    log:
        "results/logs/summary.log",
    conda:
        "../../environment.yml"
    script:
        "../scripts/summary.py"
