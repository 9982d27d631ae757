"""benchmarks/serve_load.py end to end on the CPU at a tiny size: the offline baseline, a server process, Poisson
arrivals and a closed loop through the openai client (from two client processes), and the JSON it writes."""

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

pytest.importorskip("uvicorn", reason="mor serve needs the serve extra: pip install 'mor[serve]'")
pytest.importorskip("openai", reason="the benchmark's client is the openai package (the dev extra)")
pytestmark = pytest.mark.slow  # starts processes


def test_the_serving_benchmark_runs_on_the_cpu_and_writes_its_table(tmp_path):
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "serve_load.py"), "--device", "cpu", "--quick",
               "--models", "mor-3", "--requests", "8", "--closed-requests", "12", "--client-processes", "2",
               "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads((tmp_path / "serve_load.json").read_text())
    assert report["meta"]["batch"] == 4 and report["meta"]["clients"] == 8 and report["meta"]["client_processes"] == 2
    rows = {row["load"]: row for row in report["results"]}
    assert set(rows) == {"offline", "poisson 8/s", "closed 8"}
    for load, requests in (("poisson 8/s", 8), ("closed 8", 12)):
        row = rows[load]
        assert row["requests"] == requests and row["tokens"] > requests and row["vs_offline"] > 0
        assert 0 < row["ttft_p50"] <= row["ttft_p99"] and 0 < row["tpot_p50"] <= row["tpot_p99"]
        assert 1 <= row["mean_depth"] <= 3 and row["server_ttft_mean"] > 0
    assert "closed 8" in result.stdout
