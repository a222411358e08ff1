"""The findings scorecard: each finding of the papers tested on our tables, one row per finding.

    python -m eval.findings --findings reference/findings.yaml \
        --tables table1=R/tables/table1.csv figure5=R/tables/figure5.csv … \
        --out R/tables/findings.csv --figures R/figures/findings.png R/figures/findings.pdf

The findings are declared in reference/findings.yaml, under their paper, each tied to the
paper's words in reference/paper_results.yaml (`text`: a key of `<paper>.findings`; the paper's
direction is a published fact; the keys are documented there), and measured on the tables
eval.aggregate writes, nothing else: the same rule runs at every scale. A finding is one or more contrasts of runs on one
metric. A contrast's effect is a difference of run means over seeds, a - b in the metric's units
(a and b each a run, or a run's gain x - y; no b: a against zero); its 95 % interval is Welch's
t-interval of that difference (eval.intervals: each run's standard error read back from its
table row, Welch–Satterthwaite degrees of freedom). The verdict of a contrast, in the paper's
direction (FID: lower is better, xfusion.config.METRICS):
- better / worse: `reproduced` when the interval lies on the paper's side of zero, `contradicted`
  when it lies on the other side, else `inconclusive` (it contains zero);
- same: `reproduced` inside [-margin, margin], `contradicted` wholly outside it;
- no_better: `reproduced` when the improvement's upper bound is at most the margin,
  `contradicted` when its lower bound exceeds it;
- `inconclusive` too without an interval: a run with one seed, or not measured (`note` says).
A finding is contradicted when one of its contrasts is, reproduced when all are, else
inconclusive; its row shows the contrast that decides that (the weakest of equal verdicts).
Columns: finding, source, claim, contrast, metric, effect, effect_t95_low, effect_t95_high,
seeds (per run of the contrast), paper_direction (in the effect's units), margin, verdict, note.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from eval.aggregate import write_csv
from eval.intervals import Estimate, contrast, interval_columns
from xfusion.config import METRICS, load_yaml

DIRECTIONS = ("better", "worse", "same", "no_better")
VERDICTS = ("reproduced", "inconclusive", "contradicted")  # in order of precedence, last wins
COLUMNS = ["finding", "source", "claim", "contrast", "metric", "effect",
           *interval_columns("effect"), "seeds", "paper_direction", "margin", "verdict", "note"]


@dataclass(frozen=True)
class Contrast:
    a: tuple[str, ...]  # (run,) or (x, y) for the gain x - y
    b: tuple[str, ...] = ()  # likewise; () = against zero
    match: str | None = None  # a tokens-seen column: b's step matched to a's last step


@dataclass(frozen=True)
class Finding:
    name: str
    text: str  # the key of the paper's free-text finding (reference/paper_results.yaml)
    claim: str
    source: str
    table: str
    metric: str
    direction: str
    contrasts: tuple[Contrast, ...]
    margin: float | None = None
    each: tuple[str, ...] = ()

    @property
    def sense(self) -> int:
        """+1 where a higher value is better, -1 where lower is (`<metric>_change`: its metric)."""
        base = self.metric.removesuffix("_change")
        return -1 if base in METRICS and METRICS[base].lower_is_better else 1

    @property
    def runs(self) -> set[str]:
        return {r for c in self.contrasts for r in (*c.a, *c.b)}


def _term(value: Any, where: str) -> tuple[str, ...]:
    runs = (value,) if isinstance(value, str) else tuple(value or ())
    if len(runs) not in (0, 1, 2) or not all(isinstance(r, str) for r in runs):
        raise ValueError(f"{where} = {value!r}: a run name, or [x, y] for the gain x - y")
    return runs


def declared(declarations: Mapping[str, Any]) -> list[Finding]:
    """Every entry of reference/findings.yaml (`<paper>.<finding>`), checked, in file order."""
    out = []
    for paper, section in declarations.items():
        for name, spec in (section or {}).items():
            where = f"{paper}.{name}"
            spec = dict(spec)
            direction = spec.get("direction")
            if direction not in DIRECTIONS:
                raise ValueError(f"{where}.direction = {direction!r}: one of "
                                 f"{', '.join(DIRECTIONS)}")
            if (direction in ("same", "no_better")) != ("margin" in spec):
                raise ValueError(f"{where}.margin: required with direction same / no_better only")
            contrasts = tuple(
                Contrast(_term(c.get("a"), f"{where}.contrasts[{i}].a"),
                         _term(c.get("b"), f"{where}.contrasts[{i}].b"), c.get("match"))
                for i, c in enumerate(spec.get("contrasts") or []))
            if not contrasts or any(not c.a for c in contrasts):
                raise ValueError(f"{where}.contrasts: at least one, each with a run `a`")
            if any(c.match and (len(c.a), len(c.b)) != (1, 1) for c in contrasts):
                raise ValueError(f"{where}.contrasts: `match` compares one run a with one run b")
            out.append(Finding(name, spec["text"], spec["claim"], spec["source"], spec["table"],
                               spec["metric"], direction, contrasts, spec.get("margin"),
                               tuple(spec.get("each", ()))))
    return out


def tables_read(declarations: Mapping[str, Any]) -> list[str]:
    """The experiments whose tables the scorecard reads (the rule's inputs)."""
    return list(dict.fromkeys(f.table for f in declared(declarations)))


# ---- measuring one contrast ---------------------------------------------------------------------


def ours(table: pd.DataFrame) -> pd.DataFrame:
    """A table's rows of our runs' means over seeds, the run in column `run`: not the paper's
    rows (`source`), nor one seed's (a per_seed table names the seed's run in `run`)."""
    if "variant" not in table:  # curves, probe: a row per run (and step, …) already
        return table
    rows = table[table.source == "ours"] if "source" in table else table
    if "run" in rows:
        rows = rows[rows.run.isna()].drop(columns="run")
    return rows.rename(columns={"variant": "run"})


class Missing(Exception):
    """A run, step or column a contrast needs is not in the table (its note)."""


def row_of(rows: pd.DataFrame, run: str, metric: str, step: float | None = None) -> pd.Series:
    """The run's row (at `step`, else its last measured step where the table has steps)."""
    mine = rows[rows.run == run]
    if "step" in mine and not mine.empty:
        mine = mine[mine.step == (mine.step.max() if step is None else step)]
    if mine.empty or metric not in mine or pd.isna(mine[metric].iloc[0]):
        raise Missing(f"{run}: no {metric} in the table")
    return mine.iloc[0]


def estimate(row: pd.Series, metric: str) -> Estimate:
    """The run's mean, standard error and seeds from its table row."""
    n = row.get("n_seeds", 1)
    return Estimate.from_interval(row[metric], row.get(interval_columns(metric)[1], math.nan),
                                  1 if pd.isna(n) else int(n))


MATCH_TOLERANCE = 0.1  # a matched contrast's tokens seen may differ by 10 % at most


def matched_step(rows: pd.DataFrame, f: Finding, c: Contrast, notes: list[str]):
    """b's eval step whose tokens seen (`c.match`) is nearest a's at a's last step."""
    a = row_of(rows, c.a[0], f.metric)
    theirs = rows[(rows.run == c.b[0]) & rows[f.metric].notna()] if f.metric in rows else rows[:0]
    if c.match not in rows or theirs.empty or pd.isna(a[c.match]):
        raise Missing(f"{c.match} of {c.a[0]} and {c.b[0]}: not in the table")
    nearest = theirs.iloc[int((theirs[c.match] - a[c.match]).abs().argmin())]
    gap = abs(nearest[c.match] - a[c.match]) / max(abs(a[c.match]), 1.0)
    if gap > MATCH_TOLERANCE:
        notes.append(f"{c.match} differ by {gap:.0%}: not a matched contrast")
    return nearest.step


@dataclass
class Measured:
    text: str
    effect: float = math.nan
    low: float = math.nan
    high: float = math.nan
    seeds: str = ""
    verdict: str = "inconclusive"
    score: float = -math.inf  # how far inside its verdict (judge)
    notes: list[str] = field(default_factory=list)


def measure(rows: pd.DataFrame, f: Finding, c: Contrast, where: str) -> Measured:
    """One contrast's effect a - b, its Welch interval and its verdict."""
    terms: dict[tuple[str, Any], float] = {}  # (run, step) -> coefficient of its mean
    estimates: dict[tuple[str, Any], Estimate] = {}
    notes: list[str] = []

    def add(runs: tuple[str, ...], sign: float, step=None) -> str:
        texts = []
        for run, coef in zip(runs, (1.0, -1.0)):
            row = row_of(rows, run, f.metric, step)
            key = (run, row.get("step"))
            estimates[key] = estimate(row, f.metric)
            terms[key] = terms.get(key, 0.0) + sign * coef
            at = "" if pd.isna(key[1]) else f" @ step {int(key[1])}"
            seen = f" ({c.match} {row[c.match]:.3g})" if c.match else ""
            texts.append(f"{run}{at}{seen}")
        return texts[0] if len(texts) == 1 else f"({texts[0]} - {texts[1]})"

    text = f"{f.metric}: {add(c.a, 1.0)}"
    if c.b:
        text += f" - {add(c.b, -1.0, matched_step(rows, f, c, notes) if c.match else None)}"
    else:
        text += " against 0"
    effect, low, high = contrast([(coef, estimates[k]) for k, coef in terms.items()])
    m = Measured(f"{text} [{f.table}{where}]", effect, low, high,
                 ", ".join(str(e.n) for e in estimates.values()), notes=notes)
    judge(m, f)
    return m


def judge(m: Measured, f: Finding) -> None:
    """Set the contrast's verdict and score (how far inside its verdict it is)."""
    if math.isnan(m.low) or math.isnan(m.high):
        m.notes.append("fewer than 2 seeds: no interval")
        return
    if m.notes:  # e.g. tokens seen not matched: the contrast is not the paper's
        return
    if f.direction in ("better", "worse"):
        s = f.sense if f.direction == "better" else -f.sense
        low, high = sorted((s * m.low, s * m.high))  # > 0: the paper's way
        m.verdict = "reproduced" if low > 0 else "contradicted" if high < 0 else "inconclusive"
        m.score = low
    elif f.direction == "same":
        edge = max(abs(m.low), abs(m.high))
        m.verdict = ("reproduced" if edge <= f.margin else "contradicted"
                     if m.low > f.margin or m.high < -f.margin else "inconclusive")
        m.score = f.margin - edge
    else:  # no_better: the improvement (in the metric's sense) is at most the margin
        low, high = sorted((f.sense * m.low, f.sense * m.high))
        m.verdict = ("reproduced" if high <= f.margin else "contradicted" if low > f.margin
                     else "inconclusive")
        m.score = f.margin - high
    if m.verdict == "inconclusive":
        m.notes.append("interval crosses the paper's boundary")


def paper_direction(f: Finding) -> str:
    """The paper's direction in the effect's units (a - b of the metric)."""
    if f.direction == "same":
        return f"in [-{f.margin:g}, {f.margin:g}]"
    if f.direction == "no_better":
        return f"<= {f.margin:g}" if f.sense > 0 else f">= -{f.margin:g}"
    positive = (f.direction == "better") == (f.sense > 0)
    return "> 0" if positive else "< 0"


# ---- the scorecard ------------------------------------------------------------------------------


def contrasts_of(rows: pd.DataFrame, f: Finding) -> list[Measured]:
    """Every contrast of the finding, once per value of its `each` columns."""
    parts = [((), rows)] if not f.each else list(rows.groupby(list(f.each), sort=False))
    out = []
    for key, part in parts:
        where = "".join(f", {k}={v}" for k, v in zip(f.each, key if f.each else ()))
        for c in f.contrasts:
            try:
                out.append(measure(part, f, c, where))
            except Missing as err:
                out.append(Measured(f"{f.metric} [{f.table}{where}]", notes=[str(err)]))
    return out


def score(f: Finding, tables: Mapping[str, pd.DataFrame]) -> dict[str, Any]:
    row = {"finding": f.name, "source": f.source, "claim": f.claim, "metric": f.metric,
           "paper_direction": paper_direction(f), "margin": f.margin}
    if f.table not in tables:
        return {**row, "verdict": "inconclusive", "note": f"table {f.table} not measured here"}
    measured = contrasts_of(ours(tables[f.table]), f)
    worst = max(VERDICTS.index(m.verdict) for m in measured)
    pick = min((m for m in measured if VERDICTS.index(m.verdict) == worst), key=lambda m: m.score)
    low, high = interval_columns("effect")
    note = "; ".join(dict.fromkeys(pick.notes))
    if len(measured) > 1:
        note = "; ".join(filter(None, [f"the deciding one of {len(measured)} contrasts", note]))
    return {**row, "contrast": pick.text, "effect": pick.effect, low: pick.low, high: pick.high,
            "seeds": pick.seeds, "verdict": VERDICTS[worst], "note": note}


def scorecard(declarations: Mapping[str, Any], tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.DataFrame([score(f, tables) for f in declared(declarations)], columns=COLUMNS)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--findings", required=True, help="reference/findings.yaml")
    p.add_argument("--tables", nargs="*", default=[], help="EXPERIMENT=R/tables/EXPERIMENT.csv")
    p.add_argument("--out", required=True, help="R/tables/findings.csv")
    p.add_argument("--figures", nargs="*", default=[], help="R/figures/findings.{png,pdf}")
    args = p.parse_args(argv)
    tables = {name: pd.read_csv(path) for name, path in (t.split("=", 1) for t in args.tables)}
    frame = scorecard(load_yaml(args.findings), tables)
    write_csv(frame, args.out)
    if args.figures:
        from eval import plots  # matplotlib only where a figure is asked for

        plots.save(plots.draw_scorecard(frame), args.figures)
    return frame


if __name__ == "__main__":
    main()
