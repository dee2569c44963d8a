"""The pipeline's report: one table of held-out metrics per stage (JSON and Markdown) and one PNG with every
stage's training curves.

    python -m medicalgpt.report outputs-pipeline      # reads results.jsonl and the stage directories there
"""

import json
import math
import sys
from pathlib import Path

# RL stages log a reward per step; the table shows its mean over the first and the last few steps.
REWARD_WINDOW = 5


def stage_history(stage_dir: Path) -> list[dict]:
    """A stage's logged steps: the trainer's log history, or our PPO loop's ppo_log.jsonl."""
    if (stage_dir / "ppo_log.jsonl").exists():
        return [json.loads(line) for line in (stage_dir / "ppo_log.jsonl").read_text().splitlines()]
    if (stage_dir / "trainer_state.json").exists():
        return json.loads((stage_dir / "trainer_state.json").read_text())["log_history"]
    return []


def reward_trend(history: list[dict]) -> dict:
    """Mean reward over the first and the last REWARD_WINDOW logged steps, for stages that log one; and the mean KL
    to the reference over the last ones, for those that log it (how far the policy went for that reward)."""
    rewards = [entry["reward"] for entry in history if "reward" in entry]
    if not rewards:
        return {}
    start, end = rewards[:REWARD_WINDOW], rewards[-REWARD_WINDOW:]
    trend = {"reward_start": sum(start) / len(start), "reward_end": sum(end) / len(end)}
    kls = [entry["kl"] for entry in history if "kl" in entry][-REWARD_WINDOW:]
    return {**trend, "kl_end": sum(kls) / len(kls)} if kls else trend


def plot_curves(histories: dict[str, list[dict]], path: Path) -> None:
    """One panel per stage: training loss (and eval loss), or reward for RL stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [name for name, history in histories.items() if history]
    columns = min(3, len(stages)) or 1
    fig, axes = plt.subplots(math.ceil(len(stages) / columns) or 1, columns, figsize=(5 * columns, 3.2 *
                             (math.ceil(len(stages) / columns) or 1)), squeeze=False)
    for ax, name in zip(axes.flat, stages, strict=False):
        history = histories[name]
        for key, style in (("loss", "-"), ("eval_loss", "o--"), ("reward", "-")):
            points = [(entry["step"], entry[key]) for entry in history if key in entry and "step" in entry]
            if points:
                ax.plot(*zip(*points), style, label=key)
        ax.set(title=name, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(stages):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row["metrics"]))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [f"{row['metrics'][c]:.3f}" if c in row["metrics"] else "" for c in columns]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out_dir: Path) -> str:
    """results.json, results.md and curves.png in out_dir, from results.jsonl and the stage directories."""
    rows = [json.loads(line) for line in (out_dir / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    histories = {d.name: stage_history(d) for d in sorted(out_dir.iterdir()) if d.is_dir()}
    for row in rows:
        row["metrics"].update(reward_trend(histories.get(row["name"], [])))
    table = markdown(rows)
    (out_dir / "results.json").write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    (out_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    plot_curves(histories, out_dir / "curves.png")
    return table


if __name__ == "__main__":
    print(write_report(Path(sys.argv[1])))
