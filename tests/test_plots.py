"""The figures written beside the results (urepa.plots): what each draws, read back from the figure."""
import numpy as np
import pandas as pd
import pytest

from urepa.plots import plot_cfg_sweeps, plot_fid_curves, plot_losses


@pytest.fixture
def figures(monkeypatch) -> list:
    """Every figure saved, as it was when saved (the plots close their figures afterwards)."""
    import matplotlib.figure

    saved, savefig = [], matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, **kwargs):
        saved.append(fig)
        return savefig(fig, path, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    return saved


def is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_curves_show_each_term_raw_and_smoothed_and_say_when_a_term_was_not_computed(tmp_path, figures):
    steps = np.arange(1, 101)
    log = pd.DataFrame({"step": steps, "loss": 1 / steps, "loss_diff": 0.5 / steps, "loss_token": np.nan,
                        "loss_manifold": np.nan})
    log.to_csv(tmp_path / "train_log.csv", index=False)
    plot_losses(tmp_path / "train_log.csv", tmp_path / "loss.png", "the baseline")
    assert is_png(tmp_path / "loss.png")
    (fig,) = figures
    assert fig._suptitle.get_text() == "the baseline"
    first, token, manifold = fig.axes
    # loss and loss_diff: each raw, then its rolling mean over len / 50 = 2 steps, labelled
    assert [line.get_label() for line in first.get_lines()][1::2] == ["loss", "loss_diff"]
    raw, smoothed = first.get_lines()[:2]
    np.testing.assert_array_equal(raw.get_xdata(), steps)
    np.testing.assert_allclose(raw.get_ydata(), 1 / steps)
    np.testing.assert_allclose(smoothed.get_ydata(), log["loss"].rolling(2, min_periods=1).mean())
    assert [text.get_text() for text in first.texts] == []
    for ax, name in ((token, "loss_token"), (manifold, "loss_manifold")):
        assert ax.get_lines() == []
        assert [text.get_text() for text in ax.texts] == [f"{name}: not computed (λ = 0)"]


def test_fid_curves_draw_each_ablation_against_the_step_and_the_target(tmp_path, figures):
    curves = {"urepa": {"points": [{"step": 40, "fid": 30.0}, {"step": 80, "fid": 20.0}], "target_fid": 25.0},
              "baseline": {"points": [{"step": 40, "fid": 32.0}, {"step": 80, "fid": 25.0}], "target_fid": 25.0}}
    plot_fid_curves(curves, tmp_path / "curves.png")
    assert is_png(tmp_path / "curves.png")
    (ax,) = figures[0].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"urepa", "baseline", "target 25"}
    assert list(lines["urepa"].get_xdata()) == [40, 80] and list(lines["urepa"].get_ydata()) == [30.0, 20.0]
    assert list(lines["baseline"].get_ydata()) == [32.0, 25.0]
    assert list(lines["target 25"].get_ydata()) == [25.0, 25.0]
    plot_fid_curves({"urepa": {"points": curves["urepa"]["points"], "target_fid": None}}, tmp_path / "bare.png")
    assert [line.get_label() for line in figures[1].axes[0].get_lines()] == ["urepa"]  # no target, no line


def test_cfg_sweeps_draw_fid_precision_and_recall_against_the_scale(tmp_path, figures):
    points = [{"cfg_scale": s, "fid": 10 + s, "precision": s / 10, "recall": 1 - s / 10} for s in (1.5, 3.0, 7.5)]
    plot_cfg_sweeps({"urepa": {"points": points}}, tmp_path / "sweep.png")
    assert is_png(tmp_path / "sweep.png")
    axes = figures[0].axes
    assert [ax.get_ylabel() for ax in axes] == ["FID", "precision", "recall"]
    for ax, key in zip(axes, ("fid", "precision", "recall")):
        (line,) = ax.get_lines()
        assert line.get_label() == "urepa" and ax.get_xlabel() == "CFG scale"
        assert list(line.get_xdata()) == [1.5, 3.0, 7.5]
        assert list(line.get_ydata()) == [p[key] for p in points]
