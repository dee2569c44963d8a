"""Training curves as PNG files a user can open."""

from pathlib import Path


def metric_series(log_history: list[dict], metrics: tuple[str, ...]) -> dict[str, dict[str, list[tuple]]]:
    """For each metric that was logged: its training points and its evaluation (eval_<metric>) points by step."""
    series = {}
    for metric in metrics:
        curves = {name: [(entry["step"], entry[key]) for entry in log_history if key in entry]
                  for name, key in (("train", metric), ("eval", f"eval_{metric}"))}
        if any(curves.values()):
            series[metric] = curves
    return series


def plot_metrics(log_history: list[dict], path: Path, metrics: tuple[str, ...] = ("loss",),
                 title: str = "") -> Path | None:
    """One panel per metric against the step, training as a line and evaluation as dots, each named; None when
    none of the metrics was logged."""
    series = metric_series(log_history, metrics)
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(7, 1 + 3 * len(series)), sharex=True, squeeze=False)
    for ax, (metric, curves) in zip(axes[:, 0], series.items()):
        for name, style in (("train", "-"), ("eval", "o--")):
            if curves[name]:
                ax.plot(*zip(*curves[name]), style, label=f"{name} {metric}")
        ax.set(ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
