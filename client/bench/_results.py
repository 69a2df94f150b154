"""What a scenario measured: per contender its timings, the ratios the issue's goals are
stated in, and absolute figures where a ratio means nothing (the 10,000-run scale)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Measurement:
    """One contender's timings, one per round (interleaved with the other contenders)."""

    contender: str
    seconds: list[float]
    points: int  # metric points each round delivered (0 where it means nothing)
    unit: str = "s"  # "s" per round, or "us" per call for the hot path

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def points_per_second(self) -> float:
        return self.points / self.best if self.points else 0.0


@dataclass
class Ratio:
    """``ours / baseline`` for throughput (higher is better) or per-call cost (lower is
    better), per round and of the best rounds; ``goal`` as the issue states it."""

    name: str
    per_round: list[float]
    of_best: float
    goal: float | None = None
    higher_is_better: bool = True

    @property
    def worst(self) -> float:
        return min(self.per_round) if self.higher_is_better else max(self.per_round)

    @property
    def median(self) -> float:
        return statistics.median(self.per_round)

    @property
    def judged(self) -> float:
        """The figure the goal is judged on: a throughput's worst round (the goal must hold
        in every run); a per-call cost's best-of ratio, as ``timeit`` advises (a slower
        round measures the machine's other work, not the call)."""
        return self.worst if self.higher_is_better else self.of_best

    @property
    def meets_goal(self) -> bool | None:
        if self.goal is None:
            return None
        return self.judged >= self.goal if self.higher_is_better else self.judged <= self.goal


@dataclass
class ScenarioResult:
    name: str
    title: str
    measurements: list[Measurement] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)  # absolute: name -> value
    skipped: str | None = None  # why the scenario could not run here

    def measurement(self, contender: str) -> Measurement:
        return next(m for m in self.measurements if m.contender == contender)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "measurements": [
                {
                    "contender": m.contender,
                    "unit": m.unit,
                    "per_round": m.seconds,
                    "best": m.best,
                    "points": m.points,
                    "points_per_second": m.points_per_second,
                }
                for m in self.measurements
            ],
            "ratios": [
                {
                    "name": r.name,
                    "per_round": r.per_round,
                    "of_best": r.of_best,
                    "worst": r.worst,
                    "median": r.median,
                    "goal": r.goal,
                    "higher_is_better": r.higher_is_better,
                    "judged": r.judged,
                    "meets_goal": r.meets_goal,
                }
                for r in self.ratios
            ],
            "figures": self.figures,
            "skipped": self.skipped,
        }


def throughput_ratio(
    name: str, ours: Measurement, baseline: Measurement, goal: float | None
) -> Ratio:
    """Throughput of ``ours`` over ``baseline`` (same points): baseline time / our time."""
    per_round = [b / o for o, b in zip(ours.seconds, baseline.seconds, strict=True)]
    return Ratio(name, per_round, baseline.best / ours.best, goal)
