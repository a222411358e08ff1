"""eval.plots draws every configured figure from aggregated synthetic metrics, PNG and PDF; the
lines drawn carry the CSV's numbers; a new figure of an existing measure is a config entry only."""

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import yaml

from eval import plots
from test_aggregate import CONFIG, REFERENCE, run_aggregate
from xfusion.config import MEASURES, experiments_from_dict, load_yaml

EXPERIMENTS = experiments_from_dict(load_yaml(CONFIG))
FIGURES = [n for n, e in EXPERIMENTS.items() if e.kind == "figure"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def lines(fig) -> dict[tuple[str, str], list[float]]:
    """{(panel's y label, legend label): [x0, y0, x1, y1, …]} of every line of the figure."""
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            out[(ax.get_ylabel(), line.get_label())] = [float(v) for xy in line.get_xydata()
                                                         for v in xy]
    return out


def points(part: pd.DataFrame, x: str, y: str) -> list[float]:
    """The CSV rows' (x, y) in x order, flat as `lines` gives them."""
    return [float(v) for xy in part.sort_values(x)[[x, y]].to_numpy() for v in xy]


def draw_from_csv(tmp_path, experiment, config=CONFIG):
    """The CSV eval.aggregate writes and the figure eval.plots draws from it (main, then draw)."""
    run_aggregate(tmp_path, experiment, config=config)
    csv = tmp_path / f"{experiment}.csv"
    png, pdf = tmp_path / "figures" / f"{experiment}.png", tmp_path / "figures" / f"{experiment}.pdf"
    plots.main(["--config", str(config), "--experiment", experiment, "--table", str(csv),
                "--reference", str(REFERENCE), "--out", str(png), str(pdf)])
    exp = experiments_from_dict(load_yaml(config))[experiment]
    frame = pd.read_csv(csv)
    return frame, plots.draw(exp, frame, load_yaml(REFERENCE), load_yaml(config)), png, pdf


@pytest.mark.parametrize("experiment", FIGURES)
def test_figure_png_and_pdf_written_and_non_empty(tmp_path, experiment):
    _, fig, png, pdf = draw_from_csv(tmp_path, experiment)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert not list(png.parent.glob(".*"))  # no temp files left behind
    assert lines(fig) or fig.axes[0].patches  # something was drawn


def test_curves_draw_each_runs_csv_values_against_tokens_seen(tmp_path):
    frame, fig, _, _ = draw_from_csv(tmp_path, "figure5")
    drawn = lines(fig)
    exp = EXPERIMENTS["figure5"]
    metrics = [m for m in exp.metrics if frame[m].notna().any()]  # no attribute files here
    assert metrics == ["fid", "clip", "blip"]
    for run, part in frame.groupby("run"):
        label = f"T2I share {part.t2i_ratio.iloc[0]:.0%}"  # the config's legend format
        for metric in metrics:
            assert drawn[(plots.LABELS[metric], label)] == pytest.approx(
                points(part, exp.plot["x"][metric], metric)), (run, metric)
    assert len(drawn) == len(metrics) * frame.run.nunique()


def test_faceted_curves_put_each_model_size_in_its_own_column(tmp_path):
    frame, fig, _, _ = draw_from_csv(tmp_path, "figureB")
    exp = EXPERIMENTS["figureB"]
    sizes = list(dict.fromkeys(frame.base_lm))
    assert [ax.get_title() for ax in fig.axes[:len(sizes)]] == sizes
    axes = fig.axes
    for i, metric in enumerate(m for m in exp.metrics if frame[m].notna().any()):
        for j, size in enumerate(sizes):
            ax = axes[i * len(sizes) + j]
            assert ax.get_ylabel() == plots.LABELS[metric]
            part = frame[frame.base_lm == size]
            got = {l.get_label(): [float(v) for v in l.get_ydata()] for l in ax.get_lines()}
            want = {("alignment on" if r.repa.iloc[0] else "alignment off"):
                    [float(v) for v in r.sort_values("step")[metric]]
                    for _, r in part.groupby("run")}
            assert got.keys() == want.keys(), (metric, size)
            for label in want:
                assert got[label] == pytest.approx(want[label]), (metric, size, label)


def test_probe_figure_draws_the_per_layer_accuracies(tmp_path):
    frame, fig, _, _ = draw_from_csv(tmp_path, "figureD")
    for (run, mode), part in frame.groupby(["run", "mode"]):
        label = f"I2T noise <= {part.i2t_noise_max.iloc[0]:.0%}"
        ax = next(a for a in fig.axes if a.get_title() == f"{mode} mode")
        line = next(l for l in ax.get_lines() if l.get_label() == label)
        assert [float(v) for xy in line.get_xydata() for v in xy] == pytest.approx(
            points(part, "layer", "probe"))
    assert sum(len(ax.get_lines()) for ax in fig.axes) == 4  # 2 runs x 2 modes


def test_caption_bars_are_ours_and_the_papers(tmp_path):
    frame, fig, _, _ = draw_from_csv(tmp_path, "figureE")
    for ax in fig.axes:
        part = frame[frame.metric == ax.get_title()]
        heights = sorted(p.get_height() for p in ax.patches)
        assert heights == pytest.approx(sorted([*part.ours, *part.paper]))


def test_subtitle_states_the_paper_finding(tmp_path):
    frame = run_aggregate(tmp_path, "figure6")
    fig = plots.draw(EXPERIMENTS["figure6"], frame, load_yaml(REFERENCE), load_yaml(CONFIG))
    assert "clean images (0%) give the best BLIP" in fig._suptitle.get_text()
    assert fig._suptitle.get_text().startswith(EXPERIMENTS["figure6"].caption)


def test_layer_axis_has_whole_ticks_and_token_axis_reads_in_thousands():
    layers = pd.DataFrame({"run": ["a"] * 4, "layer": [1, 2, 3, 4],
                           "probe": [50.0, 60.0, 55.0, 70.0]})
    fig, ax = plt.subplots()
    plots.draw_lines(ax, layers, "layer", "probe", plots.legend_label("{run}"))
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())

    tokens = pd.DataFrame({"run": ["a"] * 3, "t2i_tokens_seen": [0, 250_000, 500_000],
                           "fid": [90.0, 60.0, 40.0]})
    fig, ax = plt.subplots()
    plots.draw_lines(ax, tokens, "t2i_tokens_seen", "fid", plots.legend_label("{run}"))
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "500k" in labels and not any(len(label) > 5 for label in labels)


def test_legend_formats_settings_and_flags():
    part = pd.DataFrame({"run": ["r"], "repa": [True], "i2t_noise_max": [0.25]})
    assert plots.legend_label("alignment {repa:on/off}")(part) == "alignment on"
    assert plots.legend_label("I2T noise <= {i2t_noise_max:.0%}")(part) == "I2T noise <= 25%"
    assert plots.legend_label("alignment {repa:on/off}")(part.assign(repa=False)) == "alignment off"


def test_attribute_metrics_get_a_panel_where_the_csv_has_them(tmp_path):
    exp = EXPERIMENTS["figure6"]
    with_attr = plots.draw(exp, run_aggregate(tmp_path / "a", "figure6", attributes=True),
                           load_yaml(REFERENCE), load_yaml(CONFIG))
    without = plots.draw(exp, run_aggregate(tmp_path / "b", "figure6"), load_yaml(REFERENCE),
                         load_yaml(CONFIG))
    assert len(with_attr.axes) == len(without.axes) + 2
    assert "T2I attribute accuracy (%)" in {ax.get_ylabel() for ax in with_attr.axes}


def test_one_figure_per_measure_but_table():
    assert set(plots.FIGURES) == set(MEASURES) - {"table"}


def test_a_new_figure_of_an_existing_measure_is_config_only(tmp_path):
    """An experiment that exists only in a config (no code names it) gets its CSV and figure:
    BLIP and FID of two noise limits against I2T tokens seen, lines labelled by a setting."""
    raw = load_yaml(CONFIG)
    raw["experiments"]["noise_vs_i2t_tokens"] = {
        "caption": "BLIP and FID of two I2T noise limits against I2T tokens seen.",
        "measure": "curves", "steps": "every", "metrics": ["blip", "fid"],
        "settings": {"noise": "training.i2t_noise_max", "ratio": "training.t2i_ratio"},
        "tokens_seen": True,
        "plot": {"x": {"blip": "i2t_tokens_seen", "fid": "i2t_tokens_seen"},
                 "legend": "noise {noise:.2f}, ratio {ratio}"},
        "runs": {"dual_tower": {}, "noise_50": {"training.i2t_noise_max": 0.5}}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    frame, fig, png, _ = draw_from_csv(tmp_path, "noise_vs_i2t_tokens", config=config)
    assert list(frame.columns) == ["run", "step", "n_seeds", "blip", "blip_t95_low",
                                   "blip_t95_high", "fid", "fid_t95_low", "fid_t95_high", "noise",
                                   "ratio", "t2i_tokens_seen", "i2t_tokens_seen"]
    assert list(dict.fromkeys(frame.run)) == ["dual_tower", "noise_50"]
    assert png.stat().st_size > 5000
    drawn = lines(fig)
    assert set(drawn) == {(plots.LABELS[m], f"noise {n:.2f}, ratio 0.66")
                          for m in ("blip", "fid") for n in (0.0, 0.5)}
    for run, part in frame.groupby("run"):
        label = f"noise {part.noise.iloc[0]:.2f}, ratio 0.66"
        for metric in ("blip", "fid"):
            assert drawn[(plots.LABELS[metric], label)] == pytest.approx(
                points(part, "i2t_tokens_seen", metric))


def test_each_line_is_the_mean_over_seeds_in_a_band_of_its_interval(tmp_path):
    frame, fig, _, _ = draw_from_csv(tmp_path, "figure6")
    assert "mean of 3 training seeds per run, band: 95 % t-interval" in fig._suptitle.get_text()
    ax = next(a for a in fig.axes if a.get_ylabel() == plots.LABELS["fid"])
    bands = [b.get_paths()[0].vertices for b in ax.collections]  # one band per line, in order
    parts = [part.sort_values("step") for _, part in frame.groupby("run", sort=False)]
    assert len(bands) == len(parts) == len(ax.get_lines())
    for band, part in zip(bands, parts):
        # the band's outline passes through (step, low) and (step, high) of every CSV row
        corners = [(x, y) for x, lo, hi in part[["step", "fid_t95_low", "fid_t95_high"]].to_numpy()
                   for y in (lo, hi)]
        for corner in corners:
            assert any(v == pytest.approx(corner) for v in map(tuple, band)), corner
        assert (part.fid_t95_low < part.fid).all() and (part.fid < part.fid_t95_high).all()


def test_one_seed_draws_no_band_and_says_so(tmp_path):
    raw = dict(load_yaml(CONFIG), seeds=1)
    config = tmp_path / "one_seed.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    _, fig, _, _ = draw_from_csv(tmp_path, "figure6", config=config)
    assert not any(ax.collections for ax in fig.axes) and lines(fig)
    assert "one training seed per run: no interval" in fig._suptitle.get_text()


def config_with(tmp_path, name: str, spec: dict) -> Path:
    raw = load_yaml(CONFIG)
    raw["experiments"][name] = spec
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


RATIO_RUNS = {"dual_tower": {}, "ratio_50_50": {"training.t2i_ratio": 0.5}}


def legend_entries(fig) -> set[str]:
    return {line.get_label() for ax in fig.axes for line in ax.get_lines()}


def test_a_new_experiments_legend_comes_from_its_own_runs_overrides(tmp_path):
    """No legend in config: each run reads the overrides that set it apart (issue 18, item 4),
    not another figure's legend."""
    config = config_with(tmp_path, "ratio_blip", {
        "measure": "curves", "steps": "every", "metrics": ["blip"], "runs": RATIO_RUNS})
    _, fig, _, _ = draw_from_csv(tmp_path, "ratio_blip", config=config)
    assert legend_entries(fig) == {"t2i_ratio=0.66", "t2i_ratio=0.5"}


def test_a_legend_format_that_reads_the_same_for_two_runs_gets_their_overrides(tmp_path):
    """Fig. 6's legend on runs that differ in their T2I share: both would read "I2T noise <= 0%"."""
    config = config_with(tmp_path, "ratio_noise", {
        "measure": "curves", "steps": "every", "metrics": ["blip"],
        "settings": {"i2t_noise_max": "training.i2t_noise_max"},
        "plot": {"legend": "I2T noise <= {i2t_noise_max:.0%}"}, "runs": RATIO_RUNS})
    _, fig, _, _ = draw_from_csv(tmp_path, "ratio_noise", config=config)
    assert legend_entries(fig) == {"I2T noise <= 0% (t2i_ratio=0.66)",
                                   "I2T noise <= 0% (t2i_ratio=0.5)"}


def test_labels_in_config_name_the_runs(tmp_path):
    config = config_with(tmp_path, "ratio_named", {
        "measure": "curves", "steps": "every", "metrics": ["blip"],
        "plot": {"labels": {"dual_tower": "recipe (2:1)", "ratio_50_50": "1:1"}},
        "runs": RATIO_RUNS})
    _, fig, _, _ = draw_from_csv(tmp_path, "ratio_named", config=config)
    assert legend_entries(fig) == {"recipe (2:1)", "1:1"}
