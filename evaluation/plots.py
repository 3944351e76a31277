"""PNG figures of calibration, uncertainty, the posterior over A and selective prediction.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, never through ``pyplot``: no
global figure state, no GUI backend needed, and a notebook's backend is left alone. Every function
writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .metrics import expected_calibration_error, reliability_bins

__all__ = ["reliability_diagram", "uncertainty_histograms", "posterior_std_per_layer", "accuracy_coverage_plot"]

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def reliability_diagram(probs, labels, path, *, num_bins: int = 15, title: str = "Reliability diagram") -> Path:
    """Accuracy against confidence per bin (top) over the histogram of confidences (bottom).

    Args:
        probs: ``(n, K)`` averaged predictive.
        labels: ``(n,)`` gold labels.
        path: PNG file to write.
        num_bins: equal-width confidence bins (the ECE's).
        title: figure title; the ECE (%) and n are appended.
    """
    bins = reliability_bins(probs, labels, num_bins=num_bins)
    ece = 100.0 * expected_calibration_error(probs, labels, num_bins=num_bins)
    edges, count = bins["edges"], bins["count"]
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / num_bins
    filled = count > 0
    k = np.asarray(probs).shape[1]

    fig = _figure(5.5, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.bar(centers[filled], bins["accuracy"][filled], width=width, color=COLORS[0], edgecolor="black",
            linewidth=0.6, label="accuracy in bin")
    gap_low = np.minimum(bins["accuracy"], bins["confidence"])[filled]
    gap = np.abs(bins["accuracy"] - bins["confidence"])[filled]
    top.bar(centers[filled], gap, bottom=gap_low, width=width, color=COLORS[1], alpha=0.35, edgecolor=COLORS[1],
            hatch="//", linewidth=0.6, label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.axvline(1.0 / k, color="grey", linestyle=":", linewidth=1, label=f"chance confidence 1/K (K = {k})")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title}\nECE = {ece:.2f}% ({num_bins} bins), n = {int(count.sum())}", fontsize=10)

    bottom.bar(centers, count, width=width, color="grey", edgecolor="black", linewidth=0.6)
    mean_conf = float(np.max(np.asarray(probs, dtype=np.float64), axis=1).mean())
    bottom.axvline(mean_conf, color=COLORS[1], linewidth=1.5, label=f"mean confidence {mean_conf:.2f}")
    bottom.legend(loc="upper left", fontsize=8)
    bottom.set_xlabel("confidence (top-class probability)")
    bottom.set_ylabel("examples")
    bottom.set_xlim(0, 1)
    return _save(fig, path)


def _hist_range(values: Sequence[np.ndarray]) -> tuple[float, float]:
    """The data's span, padded by 5% (a fixed [0, log K] range squeezes near-uniform predictives into a bin)."""
    low = min(float(np.min(v)) for v in values)
    high = max(float(np.max(v)) for v in values)
    pad = 0.05 * (high - low) if high > low else max(1e-3, 0.05 * abs(high))
    return max(low - pad, 0.0), high + pad


def uncertainty_histograms(
    parts: Mapping[str, Mapping[str, np.ndarray]], path, *, id_task: str, num_classes: Mapping[str, int],
    title: str = "Uncertainty, in-distribution vs OOD", bins: int = 40,
) -> Path:
    """Histograms of total (raw and divided by log K), aleatoric and epistemic uncertainty, ID vs OOD.

    Args:
        parts: ``{task: uncertainty_decomposition(...)}`` (``total``, ``aleatoric``, ``epistemic`` ``(n,)``).
        path: PNG file to write.
        id_task: the in-distribution task (drawn first, labelled "ID").
        num_classes: ``{task: K}``; the maximum entropy ``log K`` of each task is marked, and the second
            panel divides the total by it so that tasks with different K compare.
    """
    order = [id_task] + [t for t in parts if t != id_task]
    values = {
        "total": {t: parts[t]["total"] for t in order},
        "normalized": {t: parts[t]["total"] / math.log(num_classes[t]) for t in order},
        "aleatoric": {t: parts[t]["aleatoric"] for t in order},
        "epistemic": {t: parts[t]["epistemic"] for t in order},
    }
    panels = [
        ("total", "predictive entropy (total) [nats]", "total (dashed: log K, the maximum)"),
        ("normalized", "predictive entropy / log K", "total divided by log K (1 = uniform)"),
        ("aleatoric", "expected entropy (aleatoric) [nats]", "aleatoric"),
        ("epistemic", "mutual information (epistemic) [nats]", "epistemic"),
    ]
    fig = _figure(18, 4.4)
    axes = fig.subplots(1, 4)
    for ax, (key, label, panel_title) in zip(axes, panels):
        ax.set_xlabel(label)
        ax.set_ylabel("density")
        ax.set_title(panel_title, fontsize=9)
        if all(np.all(v == 0) for v in values[key].values()):
            ax.text(0.5, 0.5, "0 for every example\n(point estimate, or all draws agree)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=9)
            ax.set_yticks([])
            continue
        lo, hi = _hist_range(list(values[key].values()))
        for i, task in enumerate(order):
            v = values[key][task]
            color = COLORS[i % len(COLORS)]
            role = "ID" if task == id_task else "OOD"
            ax.hist(v, bins=bins, range=(lo, hi), density=True, histtype="stepfilled", alpha=0.35, color=color,
                    edgecolor=color, linewidth=1.2, label=f"{task} ({role}, n = {len(v)}, mean {v.mean():.3g})")
            if key in ("total", "aleatoric") and lo <= math.log(num_classes[task]) <= hi:
                ax.axvline(math.log(num_classes[task]), color=color, linestyle="--", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))  # MI can be ~1e-5 nats
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


_LAYER = re.compile(r"layers\.(\d+)\.")


def _site_position(site: str) -> tuple[Optional[int], str]:
    """(transformer block index or None, module kind) of a site such as model.layers.3.self_attn.q_proj.lora_A."""
    stem = site[: -len(".lora_A")] if site.endswith(".lora_A") else site
    match = _LAYER.search(stem)
    return (int(match.group(1)) if match else None), stem.rsplit(".", 1)[-1]


def posterior_std_per_layer(
    stds: Mapping[str, np.ndarray], path, *, prior_scale: Optional[float] = None,
    title: str = "Posterior std of LoRA A per layer",
) -> Path:
    """Median (line) and 10-90% range (band) of the posterior std of A's entries, per block and module kind.

    Args:
        stds: ``{site: (rank, in_features)}`` posterior standard deviations (e.g. ``BLoBGuide.scale(site)``).
        path: PNG file to write.
        prior_scale: the prior's std, drawn as a reference line.

    Sites outside the transformer blocks (e.g. ``lm_head``) are drawn after the last block.
    """
    if not stds:
        raise ValueError("no posterior standard deviations to plot: the guide has no scale (a point estimate?)")
    series: dict[str, list[tuple[float, np.ndarray]]] = {}
    blocks = [b for b in (_site_position(s)[0] for s in stds) if b is not None]
    after = (max(blocks) + 1.5) if blocks else 0.0
    extra: dict[str, float] = {}
    for site, std in stds.items():
        block, kind = _site_position(site)
        x = float(block) if block is not None else extra.setdefault(kind, after + len(extra))
        series.setdefault(kind, []).append((x, np.asarray(std, dtype=np.float64).ravel()))
    fig = _figure(9, 4.5)
    ax = fig.subplots()
    for i, (kind, points) in enumerate(sorted(series.items())):
        points.sort(key=lambda item: item[0])
        xs = np.array([x for x, _ in points])
        med = np.array([np.median(v) for _, v in points])
        lo = np.array([np.quantile(v, 0.1) for _, v in points])
        hi = np.array([np.quantile(v, 0.9) for _, v in points])
        color = COLORS[i % len(COLORS)]
        marker = "o" if len(xs) > 1 else "s"
        ax.plot(xs, med, marker=marker, markersize=3.5, color=color, label=f"{kind} (median)")
        if len(xs) > 1:
            ax.fill_between(xs, lo, hi, color=color, alpha=0.2, label=f"{kind} (10-90%)")
        else:
            ax.errorbar(xs, med, yerr=[med - lo, hi - med], color=color, capsize=4, fmt="none")
    if prior_scale is not None:
        ax.axhline(prior_scale, color="black", linestyle="--", linewidth=1, label=f"prior std {prior_scale:g}")
    ax.set_yscale("log")
    ax.set_xlabel("transformer block" + (f" (non-block sites: {', '.join(extra)} at the right)" if extra else ""))
    ax.set_ylabel("posterior std of A entries (log scale)")
    if extra:
        ticks = sorted(set(int(b) for b in blocks))
        ax.set_xticks(ticks[:: max(1, len(ticks) // 15)] + list(extra.values()))
        ax.set_xticklabels([str(t) for t in ticks[:: max(1, len(ticks) // 15)]] + list(extra))
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def accuracy_coverage_plot(
    curves: Mapping[str, Mapping[str, np.ndarray]], path, *, title: str = "Selective prediction: accuracy vs coverage",
) -> Path:
    """Accuracy of the most confident fraction of predictions against that fraction, one line per task.

    Args:
        curves: ``{task: {"coverage": (n,), "accuracy": (n,), "aurc": float}}`` (from
            :func:`~blob_pyro.evaluation.uncertainty.selective_prediction`).
        path: PNG file to write.
    """
    fig = _figure(6.5, 4.8)
    ax = fig.subplots()
    for i, (task, curve) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        ax.plot(curve["coverage"], curve["accuracy"], color=color, linewidth=1.6,
                label=f"{task} (AURC {curve['aurc']:.3f}, full-coverage acc {curve['accuracy'][-1]:.3f})")
        ax.axhline(curve["accuracy"][-1], color=color, linestyle=":", linewidth=0.8)
    ax.set_xlabel("coverage (fraction of most confident examples kept)")
    ax.set_ylabel("accuracy on kept examples")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title + "\n(dotted: accuracy at full coverage; AURC: lower is better)", fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return _save(fig, path)
