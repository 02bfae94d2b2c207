"""results/summary.html (urepa.summary): the tiers with results side by side."""
import json
import logging
import re

import pytest

from conftest import make_runs, write_png
from urepa.report import fid_summary
from urepa.summary import render_summary, tiers_with_results


def write_tier(results, tier, seeds, offset=0.0, figures=True):
    """results/<tier>/fid.json as the fid_summary rule writes it from the runs of `make_runs` (FIDs + `offset`), the
    tier's report.html, and its two figures unless `figures` is false."""
    folder = results / tier
    _, _, sweeps, metrics = make_runs(folder / "runs", seeds)
    for by_seed in metrics.values():
        for m in by_seed.values():
            m["fid"] += offset
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fid.json").write_text(json.dumps(fid_summary(metrics, sweeps)))
    (folder / "report.html").write_text("<html></html>")
    if figures:
        write_png(folder / "fid_curve.png", "red")
        write_png(folder / "cfg_sweep.png", "blue")


def sections(page):
    return {re.search(r"<h2>([^<]*)</h2>", s).group(1): s for s in re.findall(r"<section>.*?</section>", page, re.S)}


def rows_of(section):
    rows = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", section, re.S)]
    return [row for row in rows if row]


def test_summary_of_two_tiers_shows_both_tables_linked_to_their_reports(tmp_path):
    results = tmp_path / "results"
    write_tier(results, "smoke", seeds=(0,))
    write_tier(results, "tierA", seeds=(0, 1, 2), offset=100.0, figures=False)
    assert render_summary(["smoke", "tierA"], results, results / "summary.html") == ["smoke", "tierA"]
    page = (results / "summary.html").read_text()
    by_tier = sections(page)
    assert list(by_tier) == ["smoke", "tierA"]
    # smoke, one seed: urepa 10, baseline 11; tierA, seeds 0..2: urepa 110.5 ± 0.5, baseline 112.5 ± 1.5, paired -2 ± 1
    assert [row[:5] for row in rows_of(by_tier["smoke"])] == [["urepa", "1", "10", "20", "-1"],
                                                              ["baseline", "1", "11", "20", "–"]]
    assert [row[:5] for row in rows_of(by_tier["tierA"])] == [["urepa", "3", "110.5 ± 0.5", "20 ± 0", "-2 ± 1"],
                                                              ["baseline", "3", "112.5 ± 1.5", "20 ± 0", "–"]]
    # links relative to the page, so the results folder can be moved or served as it is
    assert 'href="smoke/report.html"' in by_tier["smoke"] and 'href="tierA/report.html"' in by_tier["tierA"]
    assert re.findall(r'<img src="([^"]*)"', by_tier["smoke"]) == ["smoke/fid_curve.png", "smoke/cfg_sweep.png"]
    assert "<img" not in by_tier["tierA"]  # no figures on disk: none linked
    assert all("Stand-in feature network" in section for section in by_tier.values())  # the fixtures' network
    assert "the table's FID (the final sample set) and the curve's last point" in page


def test_a_tier_without_results_is_skipped_with_a_note_not_an_error(tmp_path, caplog):
    results = tmp_path / "results"
    write_tier(results, "smoke", seeds=(0,))
    with caplog.at_level(logging.INFO, logger="urepa.summary"):
        shown = render_summary(["tierB", "smoke"], results, results / "summary.html")
    assert shown == ["smoke"]
    assert any("tier tierB skipped" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    page = (results / "summary.html").read_text()
    assert list(sections(page)) == ["smoke"] and "Skipped (no fid.json yet): tierB." in page


def test_the_rule_finds_the_tiers_on_disk_or_the_named_ones_and_tracks_the_others_results(tmp_path):
    results = tmp_path / "results"
    write_tier(results, "tierB", seeds=(0,))
    write_tier(results, "smoke", seeds=(0,))
    (results / "rehearsal").mkdir()  # a tier folder without fid.json is not a tier with results
    found = tiers_with_results(results, None, "tierA")
    assert list(found) == ["smoke", "tierB", "tierA"]  # those on disk, sorted, then the tier being run
    assert found["tierA"] is None and len(found["smoke"]) == 64
    # the tier being run is the rule's input: no digest, so its own rebuild does not change the params
    assert tiers_with_results(results, None, "smoke")["smoke"] is None
    assert list(tiers_with_results(results, ["tierB", "tierC"], "smoke")) == ["tierB", "tierC", "smoke"]
    before = found["tierB"]
    write_tier(tmp_path / "rerun", "tierB", seeds=(0,), offset=1.0)
    (results / "tierB" / "fid.json").write_bytes((tmp_path / "rerun" / "tierB" / "fid.json").read_bytes())
    assert tiers_with_results(results, None, "tierA")["tierB"] != before


@pytest.mark.parametrize("entry", [{"fid": {"mean": 5.0, "std": None, "n": 1}}, {"note": "no fid"}])
def test_a_tier_table_takes_what_fid_json_has(tmp_path, entry):
    """An ablation entry with fewer keys (as an older fid.json, or a row another stage adds) shows what it has; an
    entry without a FID is not an ablation row."""
    results = tmp_path / "results"
    (results / "smoke").mkdir(parents=True)
    (results / "smoke" / "fid.json").write_text(json.dumps({"pretrained": entry}))
    render_summary(["smoke"], results, results / "summary.html")
    rows = rows_of(sections((results / "summary.html").read_text())["smoke"])
    assert rows == ([["pretrained", "0", "5", "–", "–", "–"]] if "fid" in entry else [])
    assert "Stand-in" not in (results / "summary.html").read_text()  # no run names a stand-in network
