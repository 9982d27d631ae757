"""SIGTERM during `mor train`: the run finishes its step, writes a checkpoint, exits 0 and resumes from there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers import make_dataset, tiny_config

from mor.train import Trainer
from mor.train.checkpoint import latest_checkpoint, verify_checkpoint
from mor.train.run_log import METRICS_FILE, read_metrics


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    data = make_dataset(tmp_path)
    config = tiny_config(data, tmp_path / "run", budget={"steps": 10_000}, run={"save_every": 0})
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "mor.cli", "train", str(config_file)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = tmp_path / "run" / METRICS_FILE
        deadline = time.monotonic() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "stopped by SIGTERM" in out
    checkpoint = latest_checkpoint(tmp_path / "run")
    verify_checkpoint(checkpoint)
    steps = [m["step"] for m in read_metrics(tmp_path / "run")]
    assert int(checkpoint.name.removeprefix("step_")) == steps[-1] >= 2  # the last finished step is saved
    assert Trainer(config, resume="latest").step == steps[-1]
