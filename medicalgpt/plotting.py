"""Loss curves as PNG files a user can open."""

from pathlib import Path


def plot_loss(log_history: list[dict], path: Path, title: str = "") -> Path | None:
    """Plot training (and evaluation) loss against the step; None when nothing was logged."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evals = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o--")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
