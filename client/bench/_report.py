"""How the bench shows its results: text lines, JSON, and a PNG bar chart of the ratios."""

from __future__ import annotations

import os
import platform
from typing import Any

from client.bench._results import ScenarioResult
from client.bench._scenarios import SCALE_GOALS


def machine() -> str:
    import mlflow

    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"MLflow {mlflow.__version__}"
    )


def to_dict(results: list[ScenarioResult]) -> dict[str, Any]:
    return {"machine": machine(), "scenarios": [r.to_dict() for r in results]}


def _goal_text(meets: bool | None) -> str:
    return "" if meets is None else ("  goal met" if meets else "  goal NOT met")


def lines(result: ScenarioResult) -> list[str]:
    out = [f"{result.name}: {result.title}"]
    if result.skipped is not None:
        out.append(f"  skipped: {result.skipped}")
    for m in result.measurements:
        rounds = " ".join(f"{s:.2f}" for s in m.seconds)
        rate = f"  {m.points_per_second:10,.0f} points/s" if m.points else ""
        out.append(f"  {m.contender:<28} best {m.best:8.2f} {m.unit}{rate}   rounds: {rounds}")
    for r in result.ratios:
        sense = ">=" if r.higher_is_better else "<="
        every = " in every round" if r.higher_is_better else ", best of rounds"
        goal = "" if r.goal is None else f"  (goal {sense} {r.goal}x{every})"
        rounds = " ".join(f"{x:.2f}" for x in r.per_round)
        out.append(
            f"  {r.name}: {r.of_best:.2f}x of the best; rounds {rounds}{goal}"
            f"{_goal_text(r.meets_goal)}"
        )
    for key, value in result.figures.items():
        bound = SCALE_GOALS.get(key)
        verdict = "" if bound is None else f"  (goal < {bound:g}){_goal_text(value < bound)}"
        out.append(f"  {key:<28} {value:10,.1f}{verdict}")
    return out


def plot(results: list[ScenarioResult], path: str) -> None:
    """A bar chart of every ratio as its goal is judged (a throughput's worst round, a
    per-call cost's best of rounds), its goal marked, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    ratios = [(f"{res.name}\n{r.name}", r) for res in results for r in res.ratios]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(ratios)), 5.0))
    if ratios:
        xs = list(range(len(ratios)))
        colors = [
            "tab:gray" if r.meets_goal is None else ("tab:green" if r.meets_goal else "tab:red")
            for _, r in ratios
        ]
        ax.bar(xs, [r.judged for _, r in ratios], color=colors)
        for x, (_, r) in zip(xs, ratios, strict=True):
            ax.annotate(f"{r.judged:.2f}x", (x, r.judged), ha="center", va="bottom", fontsize=8)
            if r.goal is not None:
                ax.hlines(r.goal, x - 0.4, x + 0.4, colors="black", linestyles="dashed")
        ax.set_xticks(xs, [label for label, _ in ratios], fontsize=7, rotation=20, ha="right")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_ylabel("ratio as judged; dashed: goal")
    ax.set_title(f"runactors bench: {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
