# Stage 6: the tier's comparison of ablations: fid.json and a self-contained report.html.


def compared(tier):
    return config["compare"] or [config["ablation"]]


def run_outputs(tier):
    return {
        a: {
            "metrics": f"results/{tier}/{a}/metrics.json",
            "curve": f"results/{tier}/{a}/fid_curve.json",
            "alignment": f"results/{tier}/{a}/alignment.json",
            "loss_curve": f"results/{tier}/{a}/model",
            "tsne": f"results/{tier}/{a}/tsne.png",
            "grid": f"results/{tier}/{a}/sample_grid.png",
        }
        for a in compared(tier)
    }


rule fid_summary:
    input:
        unpack(lambda w: {a: f"results/{w.tier}/{a}/metrics.json" for a in compared(w.tier)}),
    output:
        "results/{tier}/fid.json",
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
    params:
        runs=lambda w: run_outputs(w.tier),
        target_fid=config["evaluate"]["target_fid"],
    log:
        "results/{tier}/logs/report.log",
    script:
        "../scripts/report.py"
