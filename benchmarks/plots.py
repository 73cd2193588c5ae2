"""PNG plots of a run (matplotlib, the `bench` extra): throughput against concurrency, latency percentiles, scaling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.report import level_at
from benchmarks.scenarios import SCENARIOS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_vs_concurrency(results: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, scenario in SCENARIOS.items():
        levels = results.get("scenarios", {}).get(key, {}).get("levels", {})
        points = sorted((int(c), s["output_throughput_tok_s"]) for c, s in levels.items()
                        if s.get("output_throughput_tok_s") is not None)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=f"{key}: {scenario.label}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (closed loop)")
    ax.set_ylabel("output tokens / s")
    ax.set_title("Throughput against concurrency")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def latency_percentiles(results: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    keys = [k for k in SCENARIOS if level_at(results, k)]
    quantiles = ("p50", "p90", "p99")
    width = 0.8 / len(quantiles)
    for ax, metric, label in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
        for j, q in enumerate(quantiles):
            values = [(level_at(results, k) or {}).get(metric, {}).get(q) or 0.0 for k in keys]
            ax.bar([i + j * width for i in range(len(keys))], values, width, label=q)
        ax.set_xticks([i + width for i in range(len(keys))], keys)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_title(f"{label} at concurrency {results.get('ratio_concurrency')} (g: 1)")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def scaling(results: dict[str, Any], path: Path) -> Path | None:
    rows = results.get("scaling", {}).get("rows") or []
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["in_flight"] for r in rows], [r["output_throughput_tok_s"] or 0 for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct mixtures in flight")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"mode-cotd, {rows[0]['concurrency']} requests in flight")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def many_experts(results: dict[str, Any], path: Path) -> Path | None:
    rows = (results.get("experts_table") or {}).get("rows") or []
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    experts = [r["experts"] for r in rows]
    ax.plot(experts, [r["gate"]["output_throughput_tok_s"] or 0 for r in rows], marker="o", label="gate (top-2)")
    for i, m in enumerate(rows[0]["mixtures"]):
        ax.plot(experts, [r["mixtures"][i]["output_throughput_tok_s"] or 0 for r in rows], marker=".",
                label=f"{m['in_flight']} mixtures in flight")
    ax.plot(experts, [r["student"]["output_throughput_tok_s"] or 0 for r in rows], linestyle="--", color="grey",
            label="student route")
    ax.set_xscale("log")
    ax.set_xlabel("experts in the union")
    ax.set_ylabel("output tokens / s")
    ax.set_title("mode-cotd, many experts on one student")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], output: Path) -> list[Path]:
    """Every plot as a PNG in `output`; none (and a note in results) when matplotlib is missing."""
    try:
        _pyplot()
    except ImportError:
        results.setdefault("errors", {})["plots"] = "matplotlib is not installed (pip install -e '.[bench]')"
        return []
    made = [throughput_vs_concurrency(results, output / "throughput_vs_concurrency.png"),
            latency_percentiles(results, output / "latency_percentiles.png"),
            scaling(results, output / "scaling.png"), many_experts(results, output / "many_experts.png")]
    return [p for p in made if p is not None]
