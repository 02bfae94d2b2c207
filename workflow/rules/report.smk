# Stage 6: the tier's comparison of ablations: fid.json and a self-contained report.html.


def compared(tier):
    """The tier's `compare` list (else the global one), with the chosen `ablation` added when absent."""
    names = urepa_config.tier_settings(config, tier).get("compare", config["compare"])
    return list(dict.fromkeys([*names, config["ablation"]]))


def run_outputs(tier):
    return {
        a: {
            "metrics": f"results/{tier}/{a}/metrics.json",
            "curve": f"results/{tier}/{a}/fid_curve.json",
            "cfg_sweep": f"results/{tier}/{a}/cfg_sweep.json",
            "alignment": f"results/{tier}/{a}/alignment.json",
            "loss_curve": f"results/{tier}/{a}/model",
            "tsne": f"results/{tier}/{a}/tsne.png",
            "grid": f"results/{tier}/{a}/sample_grid.png",
        }
        for a in compared(tier)
    }


rule fid_summary:
    input:
        lambda w: [run[key] for run in run_outputs(w.tier).values() for key in ("metrics", "cfg_sweep")],
    output:
        "results/{tier}/fid.json",
    params:
        runs=lambda w: run_outputs(w.tier),
    log:
        "results/{tier}/logs/fid_summary.log",
    script:
        "../scripts/fid_summary.py"


rule report:
    input:
        fid="results/{tier}/fid.json",
        runs=lambda w: [path for run in run_outputs(w.tier).values() for path in run.values()],
    output:
        html="results/{tier}/report.html",
        curves=report("results/{tier}/fid_curve.png", caption="../report/fid_curve.rst", category="FID vs step"),
        sweep=report("results/{tier}/cfg_sweep.png", caption="../report/cfg_sweep.rst", category="CFG sweep"),
    params:
        runs=lambda w: run_outputs(w.tier),
        target_fid=config["evaluate"]["target_fid"],
    log:
        "results/{tier}/logs/report.log",
    script:
        "../scripts/report.py"
