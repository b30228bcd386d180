"""The numbers and plots of ``bard-data eval``: one row per (method, budget) from the samples,
the rank correlation of length with budget, and the accuracy / length plots."""

from __future__ import annotations

from pathlib import Path


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    import polars as pl

    if len(x) < 2:
        return float("nan")
    rx = pl.Series(list(x), dtype=pl.Float64).rank("average").to_numpy()
    ry = pl.Series(list(y), dtype=pl.Float64).rank("average").to_numpy()
    sx, sy = rx.std(), ry.std()
    if sx == 0 or sy == 0:
        return float("nan")
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


def summarize(samples, tolerance: float, one_sided: bool):
    """One row per (method, budget) from the samples table."""
    import numpy as np
    import polars as pl

    from bard_data.budget.fidelity import fidelity_metrics

    rows = []
    for (method, budget), g in samples.group_by(["method", "budget"], maintain_order=True):
        lengths = g["reasoning_tokens"].to_list()
        m = fidelity_metrics(lengths, [int(budget)] * len(lengths), tolerance, one_sided, g["think_closed"].to_list())
        arr = np.asarray(lengths, dtype=float)
        rows.append({
            "method": method,
            "budget": int(budget),
            "n": g.height,
            "accuracy": float(g["correct"].cast(pl.Float64).mean()),
            "reasoning_tokens_mean": float(arr.mean()),
            "reasoning_tokens_p50": float(np.percentile(arr, 50)),
            "reasoning_tokens_p90": float(np.percentile(arr, 90)),
            "deviation_mean": m["deviation_mean"],
            "within_tolerance": m["within_tolerance"],
            "overshoot": m["overshoot"],
            "undershoot": m["undershoot"],
            "think_closed": m["think_closed"],
            "completion_tokens_mean": float(g["completion_tokens"].cast(pl.Float64).mean()),
            "errors": int(g["error"].is_not_null().sum()),
        })
    table = pl.DataFrame(rows)
    rho = {
        method: spearman(g["reasoning_tokens"].to_list(), g["budget"].to_list())
        for (method,), g in samples.group_by(["method"], maintain_order=True)
    }
    table = table.with_columns(
        pl.col("method").replace_strict(rho, return_dtype=pl.Float64).alias("spearman_length_budget")
    )
    return table.sort(["method", "budget"])


def write_plots(table, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    methods = table["method"].unique(maintain_order=True).to_list()
    budgets = sorted(table["budget"].unique().to_list())
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        t = table.filter(table["method"] == m).sort("budget")
        ax.plot(t["budget"].to_list(), t["accuracy"].to_list(), marker="o", label=m)
    ax.set_ylim(-0.02, 1.02)
    paths.append(_save(fig, ax, budgets, "accuracy", "Accuracy vs budget", out / "accuracy_vs_budget.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(budgets, budgets, linestyle="--", color="gray", label="y = x")
    for m in methods:
        t = table.filter(table["method"] == m).sort("budget")
        ax.plot(t["budget"].to_list(), t["reasoning_tokens_mean"].to_list(), marker="o", label=m)
    ax.set_yscale("symlog", linthresh=1.0)  # log-like, but a mean of 0 tokens still plots
    paths.append(_save(fig, ax, budgets, "mean reasoning tokens", "Reasoning length vs budget",
                       out / "length_vs_budget.png"))
    return paths


def _save(fig, ax, budgets, ylabel: str, title: str, path: Path) -> Path:
    """The budget axis (log scale, one tick per budget), labels, legend and grid; saved, closed."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xticks(budgets)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("thinking budget (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
