"""Each benchmark runs once at a tiny size, so bench/ cannot rot. No timing is asserted:
speed is measured by `make bench` as ratios, never in the test suite."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import run


@pytest.mark.parametrize("name", list(run.BENCHMARKS))
def test_benchmark_runs_at_tiny_size_and_reports_a_ratio(name, tmp_path: Path):
    out = tmp_path / "bench.json"
    assert run.main(["--scale", "tiny", "--only", name, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    result = report["results"][name]
    assert result["ratio"] > 0, result
    assert "goal" in result and "met" in result
    if name.startswith("throughput"):
        (size,) = result["sizes"]
        assert size["events"] == run.SIZES["tiny"]["throughput"][0]
        assert all(rate > 0 for rate in size["events_per_s"].values()), size
        assert result["ratio_pipelined"] > 0
    if name == "writer-wait":
        assert result["events"] == run.SIZES["tiny"]["writer_wait"] <= result["events_deleted"]
        assert result["without_compaction"]["appends"] > 0
        assert result["during_compaction"]["appends"] > 0
