"""eval.findings: the verdict rule on synthetic tables (a known effect reproduced, a reversed one
contradicted, a noisy one inconclusive), Welch's interval against scipy's, and every declared
finding measurable on the configured experiments (no scorecard row can drop silently)."""

import math
import statistics

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from scipy import stats

from eval import findings
from test_aggregate import CONFIG, PAPER, REFERENCE, ROOT, run_aggregate
from xfusion.config import experiments_from_dict, load_yaml

T975_2 = 4.302653  # Student t, 97.5 % quantile, 2 degrees of freedom (3 seeds)
FINDINGS = ROOT / "reference" / "findings.yaml"
DECLARED = findings.declared(load_yaml(FINDINGS))


def finding(name: str) -> findings.Finding:
    return next(f for f in DECLARED if f.name == name)


def run_row(run: str, metric: str, values, **extra) -> dict:
    """A table row of `run`: the mean of its seeds' values and the t-interval, as
    eval.aggregate writes it (computed here from the textbook formula)."""
    mean = statistics.fmean(values)
    half = T975_2 * statistics.stdev(values) / math.sqrt(3) if len(values) == 3 else math.nan
    assert len(values) in (1, 3)
    return {"variant": run, "source": "ours", "n_seeds": len(values), metric: mean,
            f"{metric}_t95_low": mean - half, f"{metric}_t95_high": mean + half, **extra}


def table(metric: str, runs: dict) -> pd.DataFrame:
    return pd.DataFrame([run_row(run, metric, values) for run, values in runs.items()])


def verdict(name: str, tables: dict) -> dict:
    return findings.score(finding(name), tables)


OTHERS = ("single_tower", "gated_tower", "dual_projection")


def test_a_known_effect_is_reproduced_with_welchs_interval():
    """Dual Tower's FID 10 lower than every other variant, seeds spread by 0.5-1: reproduced."""
    dual, other = [10.0, 10.5, 9.5], [20.0, 21.0, 19.0]
    row = verdict("table1_dual_tower_best_fid",
                  {"table1": table("fid", {"dual_tower": dual, **{r: other for r in OTHERS}})})
    assert row["verdict"] == "reproduced" and row["paper_direction"] == "< 0"
    want = stats.ttest_ind(dual, other, equal_var=False).confidence_interval(0.95)
    assert row["effect"] == pytest.approx(-10.0)
    # read back from 3 table rows: the same interval as scipy's Welch test on the raw values
    assert (row["effect_t95_low"], row["effect_t95_high"]) == pytest.approx((want.low, want.high))
    assert row["seeds"] == "3, 3" and "the deciding one of 3 contrasts" in row["note"]


def test_a_reversed_effect_is_contradicted():
    """Dual Tower's FID 10 *higher*, clearly: the paper's direction is contradicted."""
    row = verdict("table1_dual_tower_best_fid",
                  {"table1": table("fid", {"dual_tower": [30.0, 30.5, 29.5],
                                           **{r: [20.0, 21.0, 19.0] for r in OTHERS}})})
    assert row["verdict"] == "contradicted" and row["effect"] == pytest.approx(10.0)
    assert row["effect_t95_low"] > 0


def test_a_noisy_effect_is_inconclusive():
    """A 1-point BLIP gain with seeds 10 points apart: the interval crosses zero."""
    row = verdict("figure8_x_fuse_improves_blip",
                  {"figure8": table("blip", {"x_fuse": [31.0, 41.0, 21.0],
                                             "dual_tower": [30.0, 40.0, 20.0]})})
    assert row["verdict"] == "inconclusive" and row["effect"] == pytest.approx(1.0)
    assert row["effect_t95_low"] < 0 < row["effect_t95_high"]
    assert "crosses" in row["note"]


def test_one_seed_is_inconclusive_and_says_why():
    row = verdict("figure8_x_fuse_improves_blip",
                  {"figure8": table("blip", {"x_fuse": [60.0], "dual_tower": [30.0]})})
    assert row["verdict"] == "inconclusive" and row["effect"] == pytest.approx(30.0)
    assert math.isnan(row["effect_t95_low"]) and "fewer than 2 seeds" in row["note"]


def test_one_contradicted_contrast_contradicts_the_finding():
    """Clean I2T best for BLIP: better than three noise limits, worse than the fourth."""
    runs = {"dual_tower": [50.0, 51.0, 49.0], "noise_25": [60.0, 61.0, 59.0],
            **{r: [40.0, 41.0, 39.0] for r in ("noise_50", "noise_75", "noise_100")}}
    row = verdict("figure6_clean_best_blip", {"figure6": table("blip", runs)})
    assert row["verdict"] == "contradicted" and "noise_25" in row["contrast"]


def test_kept_mmlu_is_same_within_margin_and_a_drop_is_worse():
    """Frozen variants: an MMLU change of exactly 0 on every seed (a zero-width interval) is
    reproduced; the single tower's drop of 13 points reproduces "loses MMLU"."""
    frozen = {r: [0.0, 0.0, 0.0] for r in ("gated_tower", "dual_projection", "dual_tower")}
    tables = {"table1": table("mmlu_change", {**frozen, "single_tower": [-13.0, -12.0, -14.0]})}
    kept = verdict("table1_frozen_keep_mmlu", tables)
    assert kept["verdict"] == "reproduced" and kept["paper_direction"] == "in [-1, 1]"
    assert kept["effect_t95_low"] == kept["effect_t95_high"] == 0
    assert verdict("table1_single_tower_loses_mmlu", tables)["verdict"] == "reproduced"
    moved = {"table1": table("mmlu_change", {**frozen, "dual_projection": [-5.0, -5.5, -4.5]})}
    assert verdict("table1_frozen_keep_mmlu", moved)["verdict"] == "contradicted"


def curve_rows(run: str, metric: str, steps: dict, column: str) -> list[dict]:
    """Curves rows of a run: {step: (tokens seen, seed values)}."""
    return [{**run_row(run, metric, values), "run": run, "step": step, column: tokens}
            for step, (tokens, values) in steps.items()]


def test_fixed_tokens_contrast_matches_b_at_as_tokens_seen():
    """More I2T data: ratio 50/50 at its last step against ratio 100/0 at the step with the same
    T2I tokens seen (half the steps), not at its own last step."""
    tokens = "t2i_tokens_seen"
    rows = (curve_rows("ratio_50_50", "fid", {1200: (600, [40.0, 41.0, 39.0]),
                                              2400: (1200, [20.0, 20.5, 19.5])}, tokens)
            + curve_rows("ratio_100_0", "fid", {1200: (1200, [30.0, 30.5, 29.5]),
                                                2400: (2400, [10.0, 10.5, 9.5])}, tokens))
    frame = pd.DataFrame(rows).drop(columns=["variant", "source"])
    row = verdict("figure5_i2t_data_improves_t2i", {"figure5": frame})
    assert "ratio_100_0 @ step 1200" in row["contrast"]
    assert "ratio_50_50 @ step 2400" in row["contrast"]
    assert row["effect"] == pytest.approx(-10.0) and row["verdict"] == "reproduced"


def test_no_better_within_margin():
    """T2I data does not improve I2T: a BLIP gain of 0.2 +- 0.3 is below the 1-point margin;
    a gain of 10 contradicts it."""
    def card(gain):
        rows = (curve_rows("ratio_50_50", "blip", {2400: (1200, [30 + gain, 30.1 + gain,
                                                                 29.9 + gain])}, "i2t_tokens_seen")
                + curve_rows("ratio_0_100", "blip", {1200: (1200, [30.0, 30.1, 29.9])},
                             "i2t_tokens_seen"))
        frame = pd.DataFrame(rows).drop(columns=["variant", "source"])
        return verdict("figure5_t2i_data_does_not_improve_i2t", {"figure5": frame})

    assert card(0.2)["verdict"] == "reproduced" and card(0.2)["paper_direction"] == "<= 1"
    assert card(10.0)["verdict"] == "contradicted"


def test_alignment_gain_of_the_smallest_model_against_the_others():
    """Supp. Fig. B: a difference of differences; FID gain (on - off) -5 for s, -1 for m and l."""
    runs = {"size_s_align_on": [15.0, 15.5, 14.5], "size_s_align_off": [20.0, 20.5, 19.5],
            "size_m_align_on": [19.0, 19.5, 18.5], "size_m_align_off": [20.0, 20.5, 19.5],
            "size_l_align_on": [19.0, 19.5, 18.5], "size_l_align_off": [20.0, 20.5, 19.5]}
    frame = table("fid", runs).rename(columns={"variant": "run"}).assign(step=2400)
    row = verdict("figureB_alignment_helps_smallest_most", {"figureB": frame})
    assert row["effect"] == pytest.approx(-4.0) and row["verdict"] == "reproduced"
    half = T975_2 * 0.5 / math.sqrt(3)  # each run's half-width; four independent runs
    assert row["effect_t95_high"] - row["effect"] > half  # wider than any one run's


def test_probe_contrast_per_mode_and_layer():
    """Clean probe beats noisy in both modes: one (mode, layer) reversed contradicts it."""
    rows = []
    for mode in ("understanding", "generation"):
        for layer in (1, 2):
            clean = [60.0, 61.0, 59.0]
            noisy = [70.0, 71.0, 69.0] if (mode, layer) == ("generation", 2) else [50.0, 51.0, 49.0]
            for run, values in (("dual_tower", clean), ("noise_50", noisy)):
                rows.append({**run_row(run, "probe", values), "run": run, "step": 2400,
                             "mode": mode, "layer": layer})
    frame = pd.DataFrame(rows).drop(columns=["variant", "source"])
    row = verdict("figureD_clean_probe_beats_noisy", {"figureD": frame})
    assert row["verdict"] == "contradicted" and "mode=generation, layer=2" in row["contrast"]
    assert "the deciding one of 4 contrasts" in row["note"]


@pytest.mark.parametrize("config", [CONFIG, PAPER], ids=["tiny", "paper"])
def test_every_declared_finding_is_measurable_on_the_configured_experiments(config):
    """Each finding's table is an experiment of the config, its runs are that experiment's runs,
    its metric one of its columns: the scorecard cannot silently drop a row."""
    exps = experiments_from_dict(load_yaml(config))
    assert len(DECLARED) == 16
    for f in DECLARED:
        assert f.table in exps, f.name
        exp = exps[f.table]
        assert f.runs <= set(exp.groups), (f.name, f.runs - set(exp.groups))
        base = f.metric.removesuffix("_change")
        assert base in exp.metrics and (base == f.metric or base in exp.changes), f.name
        assert {c.match for c in f.contrasts if c.match} <= (
            {"t2i_tokens_seen", "i2t_tokens_seen"} if exp.tokens_seen else set()), f.name
        assert set(f.each) <= ({"mode", "layer"} if exp.measure == "probe" else set()), f.name


def test_scorecard_of_aggregated_tables_has_a_row_per_finding(tmp_path):
    """eval.findings on eval.aggregate's CSVs of the tiny config: one row per declared finding,
    each measured (an effect, an interval from 3 seeds), and its figure."""
    argv = ["--findings", str(FINDINGS), "--out", str(tmp_path / "findings.csv"),
            "--figures", str(tmp_path / "findings.png")]
    tables = findings.tables_read(load_yaml(FINDINGS))
    for name in tables:
        run_aggregate(tmp_path / name, name)
    findings.main([*argv, "--tables", *(f"{n}={tmp_path / n / f'{n}.csv'}" for n in tables)])
    card = pd.read_csv(tmp_path / "findings.csv")
    assert card.finding.tolist() == [f.name for f in DECLARED]
    assert set(card.verdict) <= set(findings.VERDICTS)
    assert card.effect.notna().all() and card.effect_t95_low.notna().all()
    assert card.seeds.str.startswith("3").all()
    assert (tmp_path / "findings.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plt.close("all")


def test_each_declared_finding_names_a_finding_the_paper_states():
    """Every entry is tied to the paper's words (reference/paper_results.yaml `findings`), and
    every finding the papers state there is measured by at least one entry."""
    reference = load_yaml(REFERENCE)
    declarations = load_yaml(FINDINGS)
    for paper, entries in declarations.items():
        texts = reference[paper]["findings"]
        assert {e["text"] for e in entries.values()} == set(texts), paper


def test_a_missing_table_is_an_inconclusive_row():
    row = findings.score(finding("figure8_x_fuse_improves_fid"), {})
    assert row["verdict"] == "inconclusive" and "not measured" in row["note"]
