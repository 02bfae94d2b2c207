"""The figures written beside the results (urepa.plots): what each draws, read back from the figure."""
import numpy as np
import pandas as pd
import pytest

from urepa.plots import STAND_IN_STAMP, fid_axis_limits, plot_cfg_sweeps, plot_fid_curves, plot_losses, term_weights


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
        assert [text.get_text() for text in ax.texts] == [f"{name}: off (w = 0)"]


def test_a_term_with_weight_zero_is_marked_off_not_drawn_even_when_logged(tmp_path, figures):
    """A preset with the manifold off logs its (unweighted) Gram loss; it did not shape the training, so its panel
    says so instead of drawing it as if it were on."""
    steps = np.arange(1, 11)
    pd.DataFrame({"step": steps, "loss": 1.0, "loss_diff": 0.5, "loss_token": 0.4, "loss_manifold": 0.3,
                  "align_coeff": 0.5}).to_csv(tmp_path / "train_log.csv", index=False)
    weights = term_weights({"align_coeff": 0.5, "manifold_coeff": 0.0})
    assert weights == {"loss_token": 0.5, "loss_manifold": 0.0}
    plot_losses(tmp_path / "train_log.csv", tmp_path / "loss.png", "token only", weights)
    _, token, manifold = figures[0].axes
    assert [line.get_label() for line in token.get_lines()][1::2] == ["loss_token"] and list(token.texts) == []
    assert list(manifold.get_lines()) == [] and [t.get_text() for t in manifold.texts] == ["loss_manifold: off (w = 0)"]
    assert list(manifold.get_yticks()) == [] and list(token.get_yticks()) != []  # an off panel has no scale to read
    # without weights, a log whose λ is 0 throughout (the baseline's, had it logged its terms) is off as well
    pd.DataFrame({"step": steps, "loss": 1.0, "loss_diff": 1.0, "loss_token": 0.4, "loss_manifold": 0.3,
                  "align_coeff": 0.0}).to_csv(tmp_path / "train_log.csv", index=False)
    plot_losses(tmp_path / "train_log.csv", tmp_path / "loss.png", "λ = 0")
    assert all(list(ax.get_lines()) == [] for ax in figures[1].axes[1:])


def test_fid_curves_draw_each_ablation_against_the_step_and_the_target(tmp_path, figures):
    curves = {"urepa": {"points": [{"step": 40, "fid": 30.0}, {"step": 80, "fid": 20.0}], "target_fid": 25.0},
              "baseline": {"points": [{"step": 40, "fid": 32.0}, {"step": 80, "fid": 25.0}], "target_fid": 25.0}}
    plot_fid_curves(curves, tmp_path / "curves.png", target_source="the baseline's final curve FID")
    assert is_png(tmp_path / "curves.png")
    (ax,) = figures[0].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"urepa", "baseline", "target 25 (the baseline's final curve FID)"}
    assert list(lines["urepa"].get_xdata()) == [40, 80] and list(lines["urepa"].get_ydata()) == [30.0, 20.0]
    assert list(lines["baseline"].get_ydata()) == [32.0, 25.0]
    assert list(lines["target 25 (the baseline's final curve FID)"].get_ydata()) == [25.0, 25.0]
    assert ax.get_ylim() == pytest.approx((26 - 6.6, 26 + 6.6))  # the range 20..32 (12) plus 5 % (0.6) each side
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
    assert axes[0].get_ylim() == pytest.approx((14.5 - 3.3, 14.5 + 3.3))  # FIDs 11.5..17.5: 6 wide, 5 % margins
    assert axes[1].get_ylim() == axes[2].get_ylim() == (-0.02, 1.02)  # fractions on their whole range


def test_fid_axis_is_at_least_a_tenth_of_the_fid_wide_and_never_negative():
    # the smoke curves' FIDs differ in the third decimal: the axis spans 10 % of 250 (+ 5 % margins), not 0.002
    assert fid_axis_limits([250.000, 250.002]) == pytest.approx((250.001 - 13.75, 250.001 + 13.75))
    assert fid_axis_limits([1.0, 30.0]) == pytest.approx((0.0, 15.5 + 0.55 * 29))
    assert fid_axis_limits([0.0, 0.0]) == pytest.approx((0.0, 0.55))


@pytest.mark.parametrize("network, stamped", [("stand-in (random conv net, seed 0; NOT Inception)", True),
                                              ("inception (pt_inception-2015-12-05)", False)])
def test_figures_scored_by_the_stand_in_network_say_so_on_the_image(tmp_path, figures, network, stamped):
    curves = {"urepa": {"points": [{"step": 40, "fid": 30.0}], "target_fid": None}}
    points = [{"cfg_scale": 1.5, "fid": 10.0, "precision": 0.1, "recall": 0.2}]
    plot_fid_curves(curves, tmp_path / "curves.png", feature_network=network)
    plot_cfg_sweeps({"urepa": {"points": points}}, tmp_path / "sweep.png", feature_network=network)
    for fig in figures:
        assert [t.get_text() for t in fig.texts] == ([STAND_IN_STAMP] if stamped else [])
