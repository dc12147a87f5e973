"""The numbers every report computes: means with 95% intervals (Student t; paired or Welch for
differences), the Figure-6 curves and bands, the taxonomy's rankings and component effects."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from caffe_prune.metrics.taxonomy import ALIASES
from caffe_prune.metrics.taxonomy import components as of_name

COMPONENTS = ("input", "pointwise", "reduction", "scaling", "domino")


FIVE_BY_COMPOSITION = {composition: alias for alias, composition in ALIASES.items()}
# what the Taxonomy and Domino papers published that a sweep can be set beside (their abstracts:
# papers/000, papers/001 and 003); nothing else of theirs is quoted, and no number is derived


def paper_five(metric: str | None) -> str | None:
    """The alias when `metric` is one of papers/004's five (by name or by its composition)."""
    if not metric:
        return None
    if metric in ALIASES:
        return metric
    return FIVE_BY_COMPOSITION.get(metric)


def components(metric: str) -> dict:
    """A metric's components (caffe_prune.metrics.taxonomy.components), Domino ``none`` when plain;
    {} when the name does not parse."""
    found = of_name(metric)
    return {} if found is None else {**found, "domino": found["domino"] or "none"}


def mean_ci(values) -> tuple:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for one value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), 0.0
    from scipy import stats
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean()), float(half)


def difference_ci(a: dict, b: dict) -> tuple:
    """Mean of a - b and its 95% CI half-width. a, b: {seed: value}. Paired by seed when both
    have the same seeds (n >= 2), else Welch's unpaired interval; 0 when either has one value."""
    from scipy import stats
    if set(a) == set(b) and len(a) >= 2:
        return mean_ci([a[s] - b[s] for s in sorted(a)])
    x, y = np.array(list(a.values()), float), np.array(list(b.values()), float)
    diff = float(x.mean() - y.mean())
    if len(x) < 2 or len(y) < 2:
        return diff, 0.0
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    if vx + vy == 0:
        return diff, 0.0
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
    return diff, float(stats.t.ppf(0.975, df) * math.sqrt(vx + vy))


# what a report's x-axis (and its table's figure) measures: % of conv weights removed (the papers'),
# or % of the multiply-accumulates per image removed (a deployment's view)
MEASURES = {"weights": "percent_conv_removed", "macs": "percent_macs_removed"}
AXIS_LABELS = {"weights": "% of convolution weights removed (transitively)",
               "macs": "% of multiply-accumulates per image removed"}


def measure_of(steps, x: str = "weights") -> str:
    """The step field an x-axis reads; a run recorded before MACs were counted cannot be read by MACs."""
    key = MEASURES[x]
    if any(key not in s for s in steps):
        raise ValueError(f"these runs record no {key} (made before MACs were counted): report them by weights")
    return key


def curve(steps, x: str = "weights") -> tuple:
    """(% removed, test top-1 %) at the measured steps."""
    key = measure_of(steps, x)
    measured = [s for s in steps if "test" in s]
    return (np.array([s[key] for s in measured]), np.array([100 * s["test"]["top1"] for s in measured]))


def band(runs, x: str = "weights") -> tuple:
    """(grid of % removed, mean test top-1, 95% CI half-width) over runs, each curve interpolated on
    the grid up to its own last measured step (a run that stopped earlier leaves the mean there)."""
    grid = np.linspace(0, max(curve(r["steps"], x)[0].max() for r in runs), 200)
    ys = np.array([np.interp(grid, *curve(r["steps"], x), right=np.nan) for r in runs])
    ok = np.sum(~np.isnan(ys), axis=0) >= 1
    mean = np.nanmean(ys[:, ok], axis=0)
    half = np.array([mean_ci(col[~np.isnan(col)])[1] for col in ys[:, ok].T])
    return grid[ok], mean, half


def scores_of(runs) -> dict:
    """{metric: {seed: % conv weights removed at the report drop}}."""
    out = defaultdict(dict)
    for r in runs:
        if r["metric"] and r["removed"] is not None:
            out[r["metric"]][r["seed"]] = r["removed"]
    return out


def ranking(scores: dict) -> list:
    """[(metric, mean, CI half-width, n)], most weights removed first; equal means (to 1e-9: the
    same groups removed, summed in another order) by name."""
    rows = [(m, *mean_ci(list(v.values())), len(v)) for m, v in scores.items()]
    return sorted(rows, key=lambda row: (-round(row[1], 9), row[0]))


def component_effects(means: dict, component: str) -> list:
    """Each level of `component`: (level, metrics, mean ± CI over those metrics, paired effect ± CI,
    contexts). The paired effect compares metrics that differ in this component only: within each
    context (the other components fixed) a level's score minus the context's mean, averaged over
    contexts; so it is the level's marginal effect across the others. Metrics that lack the
    component (a plugin's bare pointwise function has no reduction or scaling) are left out."""
    parts = {m: components(m) for m in means}
    parts = {m: p for m, p in parts.items() if p and p[component] is not None}
    others = [c for c in COMPONENTS if c != component]
    by_level, contexts = defaultdict(list), defaultdict(dict)
    for m, p in parts.items():
        by_level[p[component]].append(means[m])
        contexts[tuple(p[c] for c in others)][p[component]] = means[m]
    effects = defaultdict(list)
    for members in contexts.values():
        if len(members) >= 2:
            centre = float(np.mean(list(members.values())))
            for level, value in members.items():
                effects[level].append(value - centre)
    rows = []
    for level in sorted(by_level):
        mean, half = mean_ci(by_level[level])
        effect = mean_ci(effects[level]) if effects[level] else (float("nan"), 0.0)
        rows.append((level, len(by_level[level]), mean, half, *effect, len(effects[level])))
    return rows


def weights_removed_view(means: dict) -> list:
    """The Taxonomy paper's own scaling against each other: (other scaling, contexts, mean of
    weights_removed - other ± CI, contexts where weights_removed removed more)."""
    parts = {m: components(m) for m in means}
    table = defaultdict(dict)
    for m, p in parts.items():
        if p and p["scaling"] is not None:
            table[(p["input"], p["pointwise"], p["reduction"], p["domino"])][p["scaling"]] = means[m]
    diffs = defaultdict(list)
    for row in table.values():
        if "weights_removed" in row:
            for scaling, value in row.items():
                if scaling != "weights_removed":
                    diffs[scaling].append(row["weights_removed"] - value)
    return [(s, len(d), *mean_ci(d), sum(x > 0 for x in d)) for s, d in sorted(diffs.items())]
