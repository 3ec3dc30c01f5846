"""The benchmarks run and report, with a tiny N on the test servers. Speed is never asserted
here: that is what `make bench` reports, as ratios against baselines."""

from __future__ import annotations

import json
from pathlib import Path

from adapters.dev.servers import ServerURLs
from bench.context import BenchContext, Sizes
from bench.harness import format_table
from bench.run import all_benchmarks, run_benchmarks, write_report


def test_every_benchmark_reports_both_sides_and_a_ratio(
    servers: ServerURLs, owner_database_url: str, tmp_path: Path
) -> None:
    # The bench's baselines make tables of their own and it starts `echotransact run` (which
    # migrates): it gets the owner's URL, as `make bench` does with the servers' URL.
    ctx = BenchContext.create(servers, owner_database_url)
    try:
        report = run_benchmarks(ctx, sizes=Sizes.uniform(20), rounds=1, warmup=False)
    finally:
        ctx.close()

    assert report.errors == {}
    expected = [b.name for b in all_benchmarks(ctx, Sizes.uniform(20))]
    assert [r.name for r in report.results] == expected
    for result in report.results:
        assert result.metrics, result.name
        assert [side for side, _ in result.samples] == ["ours", "baseline"]
        for metric in result.metrics:
            assert metric.ours.median > 0 and metric.baseline.median > 0, (result.name, metric.metric)
            assert metric.ratio.median > 0 and metric.ratio.values == [metric.ratio.median]
            assert metric.target_ratio > 0 and metric.target_why
            assert metric.within_target == (metric.ratio.median <= metric.target_ratio)

    table = format_table(report.results)
    assert all(name in table for name in expected)

    saved = json.loads(write_report(report, tmp_path, "smoke").read_text())
    assert [r["name"] for r in saved["results"]] == expected
    assert {"ours", "baseline", "ratio", "target_ratio", "within_target"} <= set(saved["results"][0]["metrics"][0])
