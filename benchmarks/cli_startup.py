"""Start-up time of the ``mor`` command: how long ``mor --help`` and an argument error take to answer.

Each command runs in a fresh interpreter, as a user would run it; the median of ``--repeats`` runs is reported.
Measured in the same run as baselines: a bare ``python -c pass`` (the interpreter's own start) and
``python -c "import torch"`` (what every command paid before its imports were made lazy). CPU only.

    python benchmarks/cli_startup.py --out bench-out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS: dict[str, list[str]] = {
    "python -c pass (baseline)": ["-c", "pass"],
    "python -c 'import torch' (baseline)": ["-c", "import torch"],
    "mor --help": ["-m", "mor.cli", "--help"],
    "mor train --help": ["-m", "mor.cli", "train", "--help"],
    "mor train x.yaml --set oops (error)": ["-m", "mor.cli", "train", "x.yaml", "--set", "oops"],
}


def seconds(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="runs per command; the median is reported")
    parser.add_argument("--out", type=Path, help="write cli_startup.json into this folder")
    args = parser.parse_args()

    for command in COMMANDS.values():  # warm the file cache: a first run also reads the files from disk
        seconds(command)
    rows = []
    for name, command in COMMANDS.items():
        times = [seconds(command) for _ in range(args.repeats)]
        rows.append({"command": name, "median_s": statistics.median(times), "min_s": min(times),
                     "max_s": max(times), "repeats": args.repeats})
    width = max(len(r["command"]) for r in rows)
    print(f"{'command':<{width}}  median s   min s   max s")
    for r in rows:
        print(f"{r['command']:<{width}}  {r['median_s']:8.3f}  {r['min_s']:6.3f}  {r['max_s']:6.3f}")
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load:.2f} when done")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "cli_startup.json"
        path.write_text(json.dumps({"results": rows, "python": platform.python_version(), "cpus": os.cpu_count(),
                                    "load_average_1min": load, "machine": platform.machine()}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
