"""eval.plots draws every configured figure from aggregated synthetic metrics, PNG and PDF."""


import pytest

from eval import plots
from test_aggregate import CONFIG, REFERENCE, run_aggregate
from xfusion.config import experiments_from_dict, load_yaml

FIGURES = [n for n, e in experiments_from_dict(load_yaml(CONFIG)).items() if e.kind == "figure"]


@pytest.mark.parametrize("experiment", FIGURES)
def test_figure_png_and_pdf_written_and_non_empty(tmp_path, experiment):
    run_aggregate(tmp_path, experiment)
    png, pdf = tmp_path / "figures" / f"{experiment}.png", tmp_path / "figures" / f"{experiment}.pdf"
    plots.main(["--config", str(CONFIG), "--experiment", experiment, "--table",
                str(tmp_path / f"{experiment}.csv"), "--reference", str(REFERENCE),
                "--out", str(png), str(pdf)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 1000
    assert not list(png.parent.glob(".*"))  # no temp files left behind


def test_subtitle_states_the_paper_finding(tmp_path):
    frame = run_aggregate(tmp_path, "figure6")
    fig = plots.draw("figure6", frame, load_yaml(REFERENCE), "Fig. 6")
    assert "clean images (0%) give the best BLIP" in fig._suptitle.get_text()


def test_layer_axis_has_whole_ticks_and_token_axis_reads_in_thousands():
    import matplotlib.pyplot as plt
    import pandas as pd

    layers = pd.DataFrame({"run": ["a"] * 4, "layer": [1, 2, 3, 4],
                           "accuracy": [50.0, 60.0, 55.0, 70.0]})
    fig, ax = plt.subplots()
    plots.draw_lines(ax, layers, "layer", "accuracy", "run", plots.run_label())
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())

    tokens = pd.DataFrame({"run": ["a"] * 3, "t2i_tokens_seen": [0, 250_000, 500_000],
                           "fid": [90.0, 60.0, 40.0]})
    fig, ax = plt.subplots()
    plots.draw_lines(ax, tokens, "t2i_tokens_seen", "fid", "run", plots.run_label())
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert "500k" in labels and not any(len(label) > 5 for label in labels)
    plt.close("all")


def test_attribute_metrics_get_a_panel_where_the_csv_has_them(tmp_path):
    with_attr = plots.draw("figure6", run_aggregate(tmp_path / "a", "figure6", attributes=True),
                           load_yaml(REFERENCE))
    without = plots.draw("figure6", run_aggregate(tmp_path / "b", "figure6"), load_yaml(REFERENCE))
    assert len(with_attr.axes) == len(without.axes) + 2
    assert "T2I attribute accuracy (%)" in {ax.get_ylabel() for ax in with_attr.axes}
    plt_close_all()


def plt_close_all():
    import matplotlib.pyplot as plt
    plt.close("all")
