"""Side by side: our code and a baseline measured in interleaved rounds, compared as a cost ratio.

A shared, noisy machine makes absolute numbers meaningless from one run to the next; a ratio of
two workloads measured moments apart on the same machine is much steadier. Each round runs both
sides, alternating which goes first (A B, B A, ...), so a slow spell hurts both alike. The
summary is the median per-round ratio, with its spread.

The ratio is always a cost ratio, ours over the baseline's, so lower is better and ``1.0`` is
"as cheap as the baseline": time per operation for a throughput, the latency itself for a
latency, bytes for memory. A benchmark is within target when its median ratio is at most the
target ratio.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

OURS = "ours"
BASELINE = "baseline"

Sample = dict[str, float]


@dataclass(frozen=True)
class Metric:
    """One number a benchmark reports for both sides, and the ratio it aims at."""

    key: str  # in the samples, e.g. "commands_per_s"
    label: str  # for the table, e.g. "commands/s"
    higher_is_better: bool
    target_ratio: float  # ours' cost / the baseline's cost must not exceed this
    target_why: str  # where the target comes from

    def cost_ratio(self, ours: float, baseline: float) -> float:
        if ours <= 0 or baseline <= 0:
            raise ValueError(f"{self.key}: both sides must be positive, got ours={ours} baseline={baseline}")
        return baseline / ours if self.higher_is_better else ours / baseline


class Benchmark:
    """A pair of workloads. Subclasses set the class attributes and implement the three runs.

    ``run_ours`` and ``run_baseline`` do their own untimed preparation and time only the work
    itself; each returns a sample with a value for every metric key.
    """

    name: str
    ours: str  # what our side does, one line
    baseline: str  # what the baseline does, one line
    metrics: tuple[Metric, ...]

    def setup(self) -> None:
        """Untimed: seed data, open connections, start servers."""

    def run_ours(self, round_no: int) -> Sample:
        raise NotImplementedError

    def run_baseline(self, round_no: int) -> Sample:
        raise NotImplementedError

    def close(self) -> None:
        """Release whatever setup made; called even when a run failed."""

    def describe(self) -> dict[str, Any]:
        """Sizes and settings worth keeping with the numbers."""
        return {}


@dataclass
class Series:
    median: float
    values: list[float]


@dataclass
class Ratio:
    median: float
    low: float
    high: float
    spread_pct: float  # (high - low) / median
    values: list[float]


@dataclass
class MetricResult:
    benchmark: str
    metric: str
    label: str
    higher_is_better: bool
    ours: Series
    baseline: Series
    ratio: Ratio
    target_ratio: float
    target_why: str
    within_target: bool


@dataclass
class BenchmarkResult:
    name: str
    ours: str
    baseline: str
    details: dict[str, Any]
    rounds: int
    seconds: float
    load_average: tuple[float, float]  # 1-minute load before and after
    metrics: list[MetricResult] = field(default_factory=list)
    # Every sample of every round, in the order they were taken: ("ours" | "baseline", sample).
    samples: list[tuple[str, Sample]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return -1.0


def run_interleaved(
    bench: Benchmark, *, rounds: int, warmup: bool, progress: Callable[[str], None] = lambda _: None,
) -> BenchmarkResult:
    """Set the benchmark up, optionally warm both sides, then run ``rounds`` rounds, A B then B A."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    started = time.perf_counter()
    load_before = _load()
    runs: dict[str, Callable[[int], Sample]] = {OURS: bench.run_ours, BASELINE: bench.run_baseline}
    taken: list[tuple[str, Sample]] = []
    bench.setup()
    try:
        if warmup:
            progress(f"{bench.name}: warm-up")
            runs[OURS](0)
            runs[BASELINE](0)
        for round_no in range(1, rounds + 1):
            order = (OURS, BASELINE) if round_no % 2 else (BASELINE, OURS)
            for side in order:
                sample = runs[side](round_no)
                missing = [m.key for m in bench.metrics if m.key not in sample]
                if missing:
                    raise RuntimeError(f"{bench.name} {side} returned no {', '.join(missing)}")
                taken.append((side, sample))
            progress(f"{bench.name}: round {round_no}/{rounds} done")
        details = bench.describe()
    finally:
        bench.close()
    result = BenchmarkResult(
        name=bench.name, ours=bench.ours, baseline=bench.baseline, details=details, rounds=rounds,
        seconds=round(time.perf_counter() - started, 3), load_average=(load_before, _load()), samples=taken,
    )
    ours = [s for side, s in taken if side == OURS]
    base = [s for side, s in taken if side == BASELINE]
    for metric in bench.metrics:
        ours_values = [s[metric.key] for s in ours]
        base_values = [s[metric.key] for s in base]
        ratios = [metric.cost_ratio(o, b) for o, b in zip(ours_values, base_values, strict=True)]
        median_ratio = statistics.median(ratios)
        result.metrics.append(MetricResult(
            benchmark=bench.name, metric=metric.key, label=metric.label,
            higher_is_better=metric.higher_is_better,
            ours=Series(statistics.median(ours_values), ours_values),
            baseline=Series(statistics.median(base_values), base_values),
            ratio=Ratio(median_ratio, min(ratios), max(ratios),
                        100.0 * (max(ratios) - min(ratios)) / median_ratio, ratios),
            target_ratio=metric.target_ratio, target_why=metric.target_why,
            within_target=median_ratio <= metric.target_ratio,
        ))
    return result


# -- the table ----------------------------------------------------------------------------------


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"


def format_table(results: Sequence[BenchmarkResult]) -> str:
    """One line per metric: ours, baseline, median cost ratio (min-max over rounds), target."""
    header = ("benchmark", "metric", "ours", "baseline", "cost ratio (min-max)", "target", "within")
    rows = [header]
    for result in results:
        for m in result.metrics:
            rows.append((
                m.benchmark, m.label, _number(m.ours.median), _number(m.baseline.median),
                f"{_ratio(m.ratio.median)} ({_ratio(m.ratio.low)}-{_ratio(m.ratio.high)})",
                f"<= {_ratio(m.target_ratio)}", "yes" if m.within_target else "NO",
            ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    right = {2, 3}
    lines = []
    for n, row in enumerate(rows):
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths, strict=False))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    missed = [m for r in results for m in r.metrics if not m.within_target]
    lines.append("")
    if missed:
        lines.append(f"MISSED {len(missed)} of {sum(len(r.metrics) for r in results)} targets:")
        for m in missed:
            lines.append(f"  - {m.benchmark} {m.label}: {_ratio(m.ratio.median)} the baseline's cost, "
                         f"target <= {_ratio(m.target_ratio)} ({m.target_why})")
    else:
        lines.append(f"All {sum(len(r.metrics) for r in results)} targets met.")
    lines.append("cost ratio = ours / baseline in time (or bytes) per unit of work; lower is better.")
    return "\n".join(lines)
