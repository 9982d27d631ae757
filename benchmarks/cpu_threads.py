"""CPU training speed of the quickstart model against torch's thread settings, on an idle and on a busy machine.

Each setting trains the quickstart model (``mor quickstart``'s shape and batch: 8 x 128 tokens a step) in a fresh
process, since OpenMP reads ``OMP_WAIT_POLICY`` when torch loads, and reports the median time per step of the
logged intervals (start-up excluded). "busy" runs one competing process that spins on one core for the whole
measurement, as a neighbour does on a shared machine. The baseline of the same run is torch's default: as many
threads as cores, OpenMP's default wait policy. CPU only.

    python benchmarks/cpu_threads.py --steps 40 --out bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TRAIN = """
import json, sys, torch
from mor.cli.quickstart import QUICKSTART_MODEL
from mor.train import config_from_dict, train
data, out, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
train(config_from_dict({
    "model": QUICKSTART_MODEL, "data": {"path": data, "seq_len": 128, "val_split": None},
    "budget": {"steps": steps}, "batch": {"micro_batch_size": 8, "grad_accum": 1},
    "run": {"out_dir": out, "log_every": 5, "save_every": 0, "progress": False}}))
rates = [r["tokens_per_s"] for r in map(json.loads, open(out + "/metrics.jsonl")) if "tokens_per_s" in r][1:]
print(json.dumps(rates))
"""


def seconds_per_step(data: Path, out: Path, steps: int, threads: int, policy: str | None) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    result = subprocess.run([sys.executable, "-c", TRAIN, str(data), str(out), str(steps), str(threads)], env=env,
                            capture_output=True, text=True, check=True)
    rates = json.loads(result.stdout.splitlines()[-1])
    return 8 * 128 / statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per setting (the first 5 are not timed)")
    parser.add_argument("--out", type=Path, help="write cpu_threads.json into this folder")
    args = parser.parse_args()

    from mor.data.sample import prepare_sample

    cores = os.cpu_count() or 1
    settings = [(cores, None), (cores, "PASSIVE"), (1, None)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_sample(data, progress=False)
        for load in ("idle", "busy"):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                for i, (threads, policy) in enumerate(settings):
                    step = seconds_per_step(data, Path(tmp) / f"{load}-{i}", args.steps, threads, policy)
                    rows.append({"machine": load, "threads": threads, "omp_wait_policy": policy or "default",
                                 "seconds_per_step": step})
            finally:
                if spinner:
                    spinner.kill()
    baseline = {r["machine"]: r["seconds_per_step"] for r in rows if r["threads"] == cores and
                r["omp_wait_policy"] == "default"}
    print(f"{'machine':<8} {'threads':>7}  {'OMP_WAIT_POLICY':<15} {'s/step':>7}  vs default")
    for r in rows:
        print(f"{r['machine']:<8} {r['threads']:>7}  {r['omp_wait_policy']:<15} {r['seconds_per_step']:7.3f}  "
              f"{r['seconds_per_step'] / baseline[r['machine']]:.2f}x")
    print(f"{cores} CPUs; load average {os.getloadavg()[0]:.2f} when done (other processes inflate every figure)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "cpu_threads.json"
        path.write_text(json.dumps({"cpus": cores, "steps": args.steps, "results": rows}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
