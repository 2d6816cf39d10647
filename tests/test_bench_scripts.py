"""Every benchmark script starts: its imports resolve and its flags parse (`--help`). The
benchmarks themselves are run by `make bench`, never timed in tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if "argparse" in p.read_text())


def test_the_benchmarks_are_found():
    assert {"bench_model.py", "bench_server.py", "bench_stream.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_starts(script):
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_bulk_rates_come_from_the_server_token_counter():
    sys.path.insert(0, str(BENCH))
    import loadgen

    gen = loadgen.LoadGen(
        {"inputs": "texts", "items": [], "lengths": [], "idle_item": "", "idle_length": 0}
    )
    before = {"roberta_batch_real_tokens_total": 0.0, "roberta_batches_total": 0.0}
    after = {"roberta_batch_real_tokens_total": 40_000.0, "roberta_batches_total": 30.0}

    def summary(items_per_request: int) -> dict:
        spec = loadgen.PhaseSpec("p", items_per_request=items_per_request, duration_s=10.0)
        col = loadgen.Collector()
        # Replies in clumps of eight at 1, 4 and 7 s: a reply-based rate of 3,000 tok/s.
        for t in (1.0, 4.0, 7.0):
            for k in range(8):
                col.samples.append(loadgen.Sample(0.0, t + 0.001 * k, 1125, items_per_request))
        return gen._summarize(spec, col, (0.0, 10.0), before, after)

    bulk = summary(64)
    assert bulk["rate_source"] == "server metrics"
    assert bulk["useful_tokens_per_s"] == 4000.0
    assert bulk["reply_tokens_per_s"] == pytest.approx(3000.0, rel=0.01)
    # One text per request: the replies count (24 here), unless there are too few of them.
    assert summary(1)["rate_source"] == "replies"
    assert loadgen.reply_rate_is_coarse(loadgen.PhaseSpec("p"), loadgen.MIN_REPLIES_FOR_RATE - 1)


def test_ab_configurations_and_phases_parse():
    sys.path.insert(0, str(BENCH))
    import bench_ab

    name, env, flags = bench_ab.parse_config("old=PYTHONPATH=/x/server:/x/client --dtype float32")
    assert (name, env, flags) == (
        "old",
        {"PYTHONPATH": "/x/server:/x/client"},
        ["--dtype", "float32"],
    )
    assert bench_ab.parse_config("now=") == ("now", {}, [])
    with pytest.raises(Exception, match="NAME=FLAGS"):
        bench_ab.parse_config("no-name")
    assert bench_ab.phase_spec("c64") == {"concurrency": 64, "items_per_request": 64}
    assert bench_ab.phase_spec("b")["concurrency"] == 32
    assert bench_ab.phase_spec("f")["rpc"] == "info"


def test_model_bench_counts_rows_as_the_server_runs_them():
    sys.path.insert(0, str(BENCH))
    import bench_model
    import torch
    from roberta_server.executor import shape_bucket
    from roberta_server.model import SIZES, Roberta

    model = Roberta(SIZES["tiny"], with_lm_head=False).eval()
    assert bench_model.Runner(model, torch.device("cpu")).packed_rows(1000) == 1000
    runner = bench_model.Runner(model.to(torch.bfloat16), torch.device("cpu"))
    assert runner.packed_rows(1000) == shape_bucket(1000) > 1000

    group = [[0] + [5] * (n - 2) + [2] for n in (7, 30, 30, 41, 90)]  # 198 tokens
    ceiling = [[0] + [5] * 30 + [2]] * 4  # 4 x 32
    tallies = bench_model.bench_dtype(runner, [group], ceiling, seconds=0)
    assert tallies["packed"].useful_tokens == tallies["packed_again"].useful_tokens == 198
    assert tallies["packed"].computed_tokens == shape_bucket(198)
    assert tallies["equal_rows"].useful_tokens == shape_bucket(198)  # the packed batch's rows
    assert tallies["ceiling"].useful_tokens == tallies["ceiling"].computed_tokens == 128
