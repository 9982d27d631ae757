"""The isoFLOP study: learning-rate sweeps, controls and several budgets for vanilla, recursive and MoR models.

Every run is a ``configs/small/`` model trained by ``mor train`` at a forward-FLOP budget and a peak learning
rate, as defined by the grid below (the one place that defines it). Each architecture is compared at its own
best learning rate; two controls separate routing from the gated update and from the extra optimizer steps
that MoR gets at equal FLOPs; the paper's other orderings run at one budget. docs/results.md describes it.

    python scripts/isoflop_study.py --list                     # the grid, what has finished, what is left
    python scripts/isoflop_study.py --parallel 4 --max-minutes 3 --wikitext DATA/eval/wikitext2-valid.txt
    python scripts/isoflop_study.py --report                   # tables and plots from whatever has finished

A finished run is skipped and an interrupted one resumes from its last checkpoint, so the same command can be
repeated in chunks. After every run, OUT/results.json (written atomically) holds each run's metrics: final and
best validation NLL on the corpus validation split, WikiText-2 NLL, steps, tokens, FLOPs, learning rate, wall
time and the routers' statistics. Select runs with --only (glob patterns on names), --budget, --lr, --group.
A sweep whose best rate lies at an end of its rates, once all of them have finished, gets a run at half (or twice)
that rate, and so on until its best lies inside: the optimum is bracketed, not assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mor.cli.common import add_set_argument
from mor.config import parse_assignment

if TYPE_CHECKING:
    from mor.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------- the grid
# Factor-2 steps around 3e-3, the paper's value and the earlier small runs' (for batches 32x larger than these
# 65k-token steps, so the optimum may well lie lower).
LRS = (7.5e-4, 1.5e-3, 3e-3, 6e-3)


@dataclass(frozen=True)
class Arch:
    name: str
    group: str  # main, control or ordering
    config: str  # a file of configs/small/, without .yaml
    what: str
    model: tuple[str, ...] = ()  # model.* overrides of the config, as KEY=VALUE
    steps_of: str | None = None  # train as many steps as this architecture at the same budget, not to the budget


ARCHS = (
    Arch("vanilla", "main", "vanilla", "vanilla Llama, 14 layers"),
    Arch("recursive-3", "main", "recursive-3", "recursive, Middle-Cycle 1+4x3+1, no router"),
    Arch("mor-expert-3", "main", "mor-expert-3", "MoR, expert-choice, Nr=3, recursion-wise caching"),
    Arch("recursive-3-gated", "control", "mor-expert-3",
         "recursive-3 with MoR's gated update H + 0.1 sigmoid(r) f(H), every token at full depth (capacities 1)",
         model=("model.capacities=[1.0, 1.0, 1.0]",)),
    Arch("vanilla-steps", "control", "vanilla", "vanilla trained for as many steps as MoR-3 (more FLOPs)",
         steps_of="mor-expert-3"),
    Arch("mor-expert-2", "ordering", "mor-expert-2", "MoR, expert-choice, Nr=2"),
    Arch("mor-expert-4", "ordering", "mor-expert-4", "MoR, expert-choice, Nr=4"),
    Arch("recursive-2", "ordering", "recursive-2", "recursive, Middle-Cycle, Nr=2"),
    Arch("recursive-4", "ordering", "recursive-4", "recursive, Middle-Cycle, Nr=4"),
    Arch("mor-token-3", "ordering", "mor-token-3", "MoR, token-choice, Nr=3"),
    Arch("mor-expert-3-kvshare", "ordering", "mor-expert-3-kvshare", "MoR, expert-choice, Nr=3, KV sharing"),
    Arch("mor-expert-3-cycle", "ordering", "mor-expert-3", "MoR, expert-choice, Nr=3, Cycle sharing (5x3 layers)",
         model=("model.sharing=cycle",)),
    Arch("recursive-3-cycle", "ordering", "recursive-3", "recursive, Cycle sharing (5x3 layers)",
         model=("model.sharing=cycle",)),
)
# (group, budget in forward FLOPs) in the order the runs start: the main comparison and its controls at both
# budgets first, so that partial results answer the main question.
PLAN = (("main", 1e15), ("control", 1e15), ("main", 3e15), ("control", 3e15), ("ordering", 1e15), ("main", 1e16))
OPTIONAL_BUDGETS = (1e16,)  # run only when --budget names them
BUDGETS = tuple(dict.fromkeys(budget for _, budget in PLAN))
ORDERING_BUDGET = next(budget for group, budget in PLAN if group == "ordering")

JOB_FILE = "study_job.json"  # what the worker runs
STATUS_FILE = "study_status.json"  # state (training, stopped, trained, done, diverged, failed), wall times
WIKITEXT_FILE = "wikitext2.json"  # `mor eval --out` of the final checkpoint
FINISHED = ("done", "diverged")
WIKITEXT_ROWS = 100_000  # more rows than the WikiText-2 validation text holds: all of it


def sci(x: float) -> str:
    """1e15 -> '1e15', 7.5e-4 -> '7.5e-4': short, exact for the grid's values, safe in file names."""
    exponent = math.floor(math.log10(x))
    return f"{round(x / 10**exponent, 6):g}e{exponent}"


@dataclass(frozen=True)
class Run:
    arch: Arch
    budget: float
    lr: float

    @property
    def name(self) -> str:
        return f"{self.arch.name}_{sci(self.budget)}_lr{sci(self.lr)}"


def arch(name: str) -> Arch:
    return next(a for a in ARCHS if a.name == name)


def grid() -> list[Run]:
    return [Run(a, budget, lr) for group, budget in PLAN for lr in LRS for a in ARCHS if a.group == group]


def edge_runs(runs: list[Run], results: dict[str, Any]) -> list[Run]:
    """Where a sweep has not bracketed its optimum: for each (architecture, budget) of ``runs`` whose learning
    rates have all finished and whose best lies at the lowest (highest) of them, a run at half (twice) that rate."""
    sweeps: dict[tuple[Arch, float], list[Run]] = {}
    for run in runs:
        sweeps.setdefault((run.arch, run.budget), []).append(run)
    entries = results["runs"]
    extra = []
    for (a, budget), sweep in sweeps.items():
        done = [entries.get(r.name) for r in sweep]
        if any(e is None or e["state"] not in FINISHED for e in done):
            continue
        best = best_runs(done).get((a.name, budget))
        lrs = sorted(r.lr for r in sweep)
        if best is not None and best["lr"] in (lrs[0], lrs[-1]):
            extra.append(Run(a, budget, lrs[0] / 2 if best["lr"] == lrs[0] else lrs[-1] * 2))
    return extra


def plan(results: dict[str, Any]) -> list[Run]:
    """The grid, with each sweep extended past its edge for as long as its best rate lies there (a finished
    extension that is best again asks for the next one): what the study runs and reports."""
    runs = grid()
    while extra := [r for r in edge_runs(runs, results) if r not in runs]:
        runs += extra
    return runs


def select(runs: list[Run], only: Sequence[str] = (), budgets: Sequence[float] = (), lrs: Sequence[float] = (),
           groups: Sequence[str] = ()) -> list[Run]:
    """The runs that every given filter admits; optional budgets only when ``budgets`` names them."""
    def close(x: float, values: Sequence[float]) -> bool:
        return any(math.isclose(x, v, rel_tol=1e-9) for v in values)

    chosen = [r for r in runs
              if (close(r.budget, budgets) if budgets else not close(r.budget, OPTIONAL_BUDGETS))
              and (not lrs or close(r.lr, lrs)) and (not groups or r.arch.group in groups)
              and (not only or any(fnmatch.fnmatchcase(r.name, p) or fnmatch.fnmatchcase(r.arch.name, p)
                                   for p in only))]
    if not chosen:
        raise SystemExit("error: no run of the grid matches the selection; see --list for the names")
    return chosen


# ---------------------------------------------------------------------------------------------------- planning
@dataclass
class Settings:
    out: Path = Path("runs/isoflop")
    results: Path | None = None  # default OUT/results.json
    data: str = "runs/data/corpus"
    wikitext: str | None = None
    extra: list[str] = field(default_factory=list)  # --set pairs for every run (batch split, compile, ...)
    steps: int | None = None  # --steps: every run this many steps (a short try)
    parallel: int = 1
    keep_checkpoints: bool = False

    @property
    def results_path(self) -> Path:
        return self.results or self.out / "results.json"


def load(config: str, overrides: list[str], settings: Settings) -> TrainConfig:
    from mor.train.config import load_config

    return load_config(REPO / config, [*overrides, *settings.extra], steps=settings.steps)


def spec(run: Run, settings: Settings) -> dict[str, Any]:
    """What identifies a run's result: config file, the grid's overrides, and the optimizer steps and tokens
    that the trainer will resolve from them (one process)."""
    from mor.train.budget import resolve_budget

    length = [f"budget.flops={run.budget!r}"]
    if run.arch.steps_of:
        reference = spec(Run(arch(run.arch.steps_of), run.budget, run.lr), settings)
        length = ["budget.flops=null", f"budget.steps={reference['steps']}"]
    overrides = [f"optim.lr={run.lr!r}", *length, *run.arch.model]
    config_file = f"configs/small/{run.arch.config}.yaml"
    config = load(config_file, overrides, settings)
    budget = resolve_budget(config, config.model_config(), world_size=1)
    return {"config": config_file, "overrides": overrides, "steps": budget.steps, "tokens": budget.tokens}


def check_extra(settings: Settings) -> None:
    """A --set of a value the grid sets would silently change what every run's name says."""
    grid_keys = {"optim.lr", "run.out_dir", "data.path"} | {parse_assignment(o)[0] for a in ARCHS for o in a.model}
    for pair in settings.extra:
        key, _ = parse_assignment(pair)
        if key in grid_keys or key.startswith("budget."):
            raise SystemExit(f"error: --set {key}: the grid (or --data/--out) sets it; edit the grid in this script "
                             "instead, or use --steps N for a short try")


# ---------------------------------------------------------------------------------------------------- results
def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def write_json_atomic(path: Path, data: Any) -> None:
    """Serialise fully, write a temporary file beside ``path``, then rename it over the old file: a crash never
    leaves a half-written file, and a failed write (a full disk) leaves the old file and no temporary one."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temp.write_text(text)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def load_results(path: Path) -> dict[str, Any]:
    return read_json(path, {"runs": {}})


def collect(run: Run, run_dir: Path) -> dict[str, Any] | None:
    """The summary of one run directory (None if it never started): metrics.jsonl, run.json, the WikiText-2
    evaluation and the study's status file."""
    from mor.train.checkpoint import list_checkpoints
    from mor.train.run_log import METRICS_FILE, read_metrics

    job, status = read_json(run_dir / JOB_FILE), read_json(run_dir / STATUS_FILE)
    if job is None or status is None:
        return None
    info = read_json(run_dir / "run.json", {})
    records = read_metrics(run_dir) if (run_dir / METRICS_FILE).is_file() else []
    train = [r for r in records if "lm_loss" in r]
    val = [r for r in records if "val/nll" in r or "val/nll_topk" in r]
    key = "val/nll_topk" if val and "val/nll_topk" in val[-1] else "val/nll"  # top-k: the paper's number
    last_val = val[-1] if val and val[-1]["step"] == info.get("steps") else {}  # the final validation
    speeds = [r["tokens_per_s"] for r in train[1:]]  # the first logged steps include compilation
    wikitext = {m["routing"]: m["value"] for m in read_json(run_dir / WIKITEXT_FILE, {}).get("results", [])
                if m["metric"] == "token_nll"}
    return {
        "name": run.name, "arch": run.arch.name, "group": run.arch.group, "budget": run.budget, "lr": run.lr,
        "spec": job["spec"], "state": status["state"], "error": status.get("error"),
        "steps": info.get("steps"), "tokens": info.get("tokens"), "forward_flops": info.get("forward_flops"),
        "forward_flops_per_token": info.get("forward_flops_per_token"),
        "non_embedding_parameters": info.get("non_embedding_parameters"),
        # The stop signal's checkpoint comes after the last logged step; only complete checkpoints count.
        "step_reached": max([train[-1]["step"] if train else 0,
                             *(int(c.name.removeprefix("step_")) for c in list_checkpoints(run_dir))]),
        "val_nll": last_val.get(key), "val_nll_causal": last_val.get("val/nll_causal"),
        "best_val_nll": min((r[key] for r in val), default=None),
        "val_curve": [[r["step"], r[key]] for r in val],
        "train_curve": [[r["step"], r["lm_loss"]] for r in train],
        "wikitext2_nll": wikitext.get("topk", wikitext.get(None)), "wikitext2_nll_causal": wikitext.get("causal"),
        "router": {k.removeprefix("router/"): v for k, v in (train[-1] if train else {}).items()
                   if k.startswith("router/")},
        "tokens_per_s": statistics.median(speeds) if speeds else None,
        "train_s": status.get("train_s", 0.0), "eval_s": status.get("eval_s", 0.0),
        "git": info.get("git"), "device": info.get("device"),
    }


def check_same_spec(name: str, recorded: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    differences = {k: (recorded.get(k), expected.get(k)) for k in expected if recorded.get(k) != expected.get(k)}
    if differences:
        raise SystemExit(f"error: {name} in {where} differs from the grid's run (recorded, now): {differences}; "
                         "move that result away or use another --out/--results")


# ---------------------------------------------------------------------------------------------------- worker
def work(run_dir: Path) -> int:
    """Train one run to its budget (resuming from its last checkpoint), then score WikiText-2 with `mor eval`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the `mor` command does, before torch is imported
    job = read_json(run_dir / JOB_FILE)
    status = read_json(run_dir / STATUS_FILE, {})

    def update(**values: Any) -> None:
        status.update(values)
        write_json_atomic(run_dir / STATUS_FILE, status)

    try:
        if not status.get("trained"):
            start = time.perf_counter()  # wall time with imports, model building and compilation
            from mor.train import TrainingDiverged, load_config, train

            config = load_config(REPO / job["config"], job["overrides"], steps=job["steps"])
            update(state="training")
            try:
                result = train(config, resume="latest")
            except TrainingDiverged as error:  # a finding of the sweep, not a failure: never retried
                update(state="diverged", error=str(error), train_s=status.get("train_s", 0.0) + time.perf_counter()
                       - start)
                return finish(run_dir, job)
            update(state="stopped" if result.stopped_by else "trained", trained=result.stopped_by is None,
                   train_s=status.get("train_s", 0.0) + time.perf_counter() - start)
            if result.stopped_by:
                return 0
        if job["wikitext"] and not (run_dir / WIKITEXT_FILE).is_file():
            start = time.perf_counter()
            evaluate_wikitext(run_dir, job)
            update(eval_s=time.perf_counter() - start)
    except Exception as error:  # noqa: BLE001 - any failure is reported in one line and retried next time
        traceback.print_exc()
        update(state="failed", error=f"{type(error).__name__}: {error}".splitlines()[0])
        return 1
    update(state="done")
    return finish(run_dir, job)


def evaluate_wikitext(run_dir: Path, job: dict[str, Any]) -> None:
    from mor.train.checkpoint import checkpoint_dir

    checkpoint = checkpoint_dir(run_dir, job["spec"]["steps"])
    command = [sys.executable, "-m", "mor.cli", "eval", str(checkpoint), "--perplexity", job["wikitext"],
               "--perplexity-rows", str(WIKITEXT_ROWS), "--seq-len", str(job["seq_len"]),
               "--batch-size", str(job["eval_batch_size"]), "--out", str(run_dir / WIKITEXT_FILE)]
    print("$", " ".join(command), flush=True)
    code = subprocess.run(command, cwd=REPO).returncode
    if code != 0:
        raise RuntimeError(f"mor eval of {checkpoint} exited with status {code}")


def finish(run_dir: Path, job: dict[str, Any]) -> int:
    """Checkpoints of a finished run are a gigabyte each and no longer needed: its numbers are collected."""
    from mor.train.checkpoint import CHECKPOINTS

    if not job["keep_checkpoints"]:
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    return 0


# ---------------------------------------------------------------------------------------------------- scheduler
def run_study(runs: list[Run], settings: Settings, max_minutes: float | None) -> int:
    results = load_results(settings.results_path)
    specs = {r.name: spec(r, settings) for r in runs}
    todo = []
    for run in runs:
        run_dir = settings.out / "runs" / run.name
        job = read_json(run_dir / JOB_FILE)
        if job is not None:
            check_same_spec(run.name, job["spec"], specs[run.name], run_dir)
            collected = collect(run, run_dir)
            if collected is not None:
                results["runs"][run.name] = collected
        entry = results["runs"].get(run.name)
        if entry is not None:
            check_same_spec(run.name, entry["spec"], specs[run.name], settings.results_path)
        if entry is None or entry["state"] not in FINISHED:
            todo.append(run)
    write_json_atomic(settings.results_path, results)
    print(f"{len(runs) - len(todo)} of {len(runs)} selected runs finished; {len(todo)} to run, {settings.parallel} "
          f"at a time", flush=True)

    deadline = time.monotonic() + 60 * max_minutes if max_minutes is not None else math.inf
    start = time.monotonic()
    running: dict[str, tuple[Run, subprocess.Popen]] = {}
    stop: list[int] = []  # signals received

    def forward(signum: int, frame: Any) -> None:
        stop.append(signum)
        print(f"{signal.Signals(signum).name}: stopping the {len(running)} running runs at their next step (they "
              "save a checkpoint); the same command resumes them", flush=True)
        for _, process in running.values():
            with contextlib.suppress(ProcessLookupError):  # it just ended
                os.killpg(process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    failed = 0
    announced = False
    try:
        while todo or running:
            can_start = not stop and time.monotonic() < deadline
            while todo and len(running) < settings.parallel and can_start:
                run = todo.pop(0)
                running[run.name] = (run, launch(run, specs[run.name], settings))
            if todo and not can_start and not stop and not announced:
                print(f"--max-minutes reached: no new run starts; waiting for the {len(running)} running", flush=True)
                announced = True
            if not running:
                break
            time.sleep(1.0)
            for name, (run, process) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                entry = collect(run, settings.out / "runs" / name)
                if entry is None:  # it never reached training: a broken environment, not a result
                    failed += 1
                    print(f"{name} ended with status {process.returncode} before training; see its train.log",
                          flush=True)
                    continue
                results["runs"][name] = entry
                write_json_atomic(settings.results_path, results)
                failed += entry["state"] == "failed" or (process.returncode != 0 and not stop)
                done = sum(e["state"] in FINISHED for n, e in results["runs"].items() if n in specs)
                code = f" (exit status {process.returncode})" if process.returncode else ""
                print(f"[{done}/{len(runs)}] {describe(entry)}{code}; {len(running)} running, {len(todo)} waiting, "
                      f"{(time.monotonic() - start) / 60:.1f} min", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if todo:
        print(f"{len(todo)} runs not started; run the same command again to continue", flush=True)
    return 1 if failed else 0


def launch(run: Run, run_spec: dict[str, Any], settings: Settings) -> subprocess.Popen:
    run_dir = settings.out / "runs" / run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = load(run_spec["config"], run_spec["overrides"], settings)
    # Paths relative to the repository, where the worker runs: the messages that reach the results JSON (a
    # divergence names its last checkpoint) then name no folder of this machine.
    job = {"spec": run_spec, "config": run_spec["config"], "steps": settings.steps,
           "overrides": [*run_spec["overrides"], *settings.extra, f"data.path={from_repo(settings.data)}",
                         f"run.out_dir={from_repo(run_dir)}", "run.progress=false"],
           "wikitext": from_repo(settings.wikitext) if settings.wikitext else None,
           "seq_len": config.data.seq_len, "eval_batch_size": config.batch.micro_batch_size,
           "keep_checkpoints": settings.keep_checkpoints}
    write_json_atomic(run_dir / JOB_FILE, job)
    env = dict(os.environ)
    # The runs share the machine's cores (compilation, data loading): one share each instead of all each.
    share = str(max(1, (os.cpu_count() or 1) // settings.parallel))
    env.setdefault("OMP_NUM_THREADS", share)
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", share)
    print(f"start {run.name}: {run_spec['steps']} steps; log {run_dir / 'train.log'}", flush=True)
    with open(run_dir / "train.log", "a") as log:  # the worker keeps its own copy of the file
        # A session of its own: a Ctrl-C in the terminal reaches the study, which forwards it once to each run.
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(run_dir)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def from_repo(path: str | Path) -> str:
    return os.path.relpath(Path(path).resolve(), REPO)


def describe(entry: dict[str, Any]) -> str:
    wall = (entry["train_s"] + entry["eval_s"]) / 60
    if entry["state"] == "done":
        wikitext = f", WikiText-2 {entry['wikitext2_nll']:.3f}" if entry["wikitext2_nll"] is not None else ""
        return f"{entry['name']} done in {wall:.1f} min: val NLL {entry['val_nll']:.3f}{wikitext}"
    if entry["state"] in ("diverged", "failed"):
        return f"{entry['name']} {entry['state']} after {wall:.1f} min: {entry['error']}"
    return f"{entry['name']} {entry['state']} at step {entry['step_reached']} of {entry['spec']['steps']}"


# ---------------------------------------------------------------------------------------------------- listing
def list_runs(runs: list[Run], settings: Settings) -> None:
    results = load_results(settings.results_path)["runs"]
    pending_tokens = 0
    for run in runs:
        run_spec = spec(run, settings)
        entry = results.get(run.name) or {}
        state = entry.get("state", "-")
        if state not in FINISHED:
            pending_tokens += run_spec["tokens"]
        nll = entry.get("val_nll")
        print(f"{run.name:<44} {state:<9} {run_spec['steps']:>6} steps {run_spec['tokens'] / 1e6:>6.1f}M tokens"
              + (f"  val NLL {nll:.3f}" if nll is not None else ""))
    finished = [e for e in results.values() if e["state"] == "done" and e["name"] in {r.name for r in runs}]
    print(f"{len(runs)} runs, {len(finished)} done; {pending_tokens / 1e6:.0f}M training tokens left")
    if finished and pending_tokens:
        # Tokens per wall-second of one slot, as the finished runs ran (start-up, compilation and contention
        # included), times the slots.
        rate = sum(e["tokens"] for e in finished) / sum(e["train_s"] + e["eval_s"] for e in finished)
        print(f"at the finished runs' {rate / 1e3:.0f}k tokens per second and run, about "
              f"{pending_tokens / rate / settings.parallel / 60:.0f} min left with --parallel {settings.parallel}")


# ---------------------------------------------------------------------------------------------------- report
def best_runs(entries: list[dict[str, Any]]) -> dict[tuple[str, float], dict[str, Any]]:
    """Per (architecture, budget): the finished run of lowest final validation NLL, i.e. its best LR."""
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for e in entries:
        key = (e["arch"], e["budget"])
        if e["state"] == "done" and e["val_nll"] is not None and (key not in best or e["val_nll"] < best[key]["val_nll"]):
            best[key] = e
    return best


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def router_summary(stats: dict[str, Any]) -> str:
    accuracy = [stats[k] for k in sorted(stats) if k.startswith("sampling_accuracy/")]
    parts = ["sampling accuracy " + " / ".join(f"{100 * a:.1f}" for a in accuracy) + "%"] if accuracy else []
    if "dead_token_ratio" in stats:
        parts.append(f"dead tokens {100 * stats['dead_token_ratio']:.1f}%")
    if "max_violation" in stats:
        parts.append(f"MaxVio {stats['max_violation']:.3f}")
    return ", ".join(parts) or "–"


def report(results: dict[str, Any], runs: list[Run], out_dir: Path) -> list[Path]:
    """report.md (best LR per model and budget, the sweeps, the orderings) and the plots, from finished runs."""
    names = {r.name for r in runs}
    entries = [e for n, e in results["runs"].items() if n in names]
    best = best_runs(entries)
    planned = {(r.arch.name, r.budget): [x.lr for x in runs if (x.arch, x.budget) == (r.arch, r.budget)]
               for r in runs}
    finished = [e for e in entries if e["state"] in FINISHED]
    compared = [a for a in ARCHS if a.group != "ordering"]
    optional = {r.name for r in runs if r.budget in OPTIONAL_BUDGETS}
    lines = ["# isoFLOP study: results so far", "",
             f"{sum(e['name'] not in optional for e in finished)} of the grid's {len(runs) - len(optional)} runs have "
             f"finished ({sum(e['state'] == 'diverged' for e in finished)} diverged), and "
             f"{sum(e['name'] in optional for e in finished)} of the {len(optional)} optional ones at "
             f"{', '.join(map(sci, OPTIONAL_BUDGETS))} FLOPs. NLL: final validation, the corpus "
             "validation split (top-k routing for MoR); WikiText-2: its validation text. '(edge)': the best LR is "
             "at an end of the rates finished, so the optimum may lie beyond it (the study then plans a run past "
             "that end).", "",
             "## Each model at its best learning rate", "",
             "| budget | model | best LR | LRs finished | val NLL | val NLL (causal) | WikiText-2 NLL | steps | tokens "
             "| FLOPs |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    def best_lr(e: dict[str, Any]) -> str:
        """The best rate, flagged when it lies at an end of the finished ones (a diverged rate brackets too)."""
        lrs = [x["lr"] for x in finished if (x["arch"], x["budget"]) == (e["arch"], e["budget"])]
        return sci(e["lr"]) + (" (edge)" if e["lr"] in (min(lrs), max(lrs)) else "")

    for budget in BUDGETS:
        for a in compared:
            e = best.get((a.name, budget))
            if e is None:
                continue
            done = sum(x["arch"] == a.name and x["budget"] == budget for x in finished)
            lines.append(f"| {sci(budget)} | {a.name} | {best_lr(e)} | {done}/{len(planned[(a.name, budget)])} | "
                         f"{fmt(e['val_nll'])} | {fmt(e['val_nll_causal'])} | {fmt(e['wikitext2_nll'])} | "
                         f"{e['steps']} | {e['tokens'] / 1e6:.1f}M | {e['forward_flops']:.3g} |".replace("e+", "e"))
    for budget in BUDGETS:
        archs = [a for a in ARCHS if (a.name, budget) in planned and any(
            e["arch"] == a.name and e["budget"] == budget for e in finished)]
        if not archs:
            continue
        lrs = sorted({r.lr for r in runs if r.budget == budget})
        lines += ["", f"## Learning-rate sweep at {sci(budget)} FLOPs (val NLL)", "",
                  "| model | " + " | ".join(sci(lr) for lr in lrs) + " |", "|---|" + "---:|" * len(lrs)]
        for a in archs:
            cells = []
            for lr in lrs:
                e = next((x for x in finished if (x["arch"], x["budget"], x["lr"]) == (a.name, budget, lr)), None)
                cell = "–" if e is None else "diverged" if e["state"] == "diverged" else fmt(e["val_nll"])
                cells.append(f"**{cell}**" if e is not None and e is best.get((a.name, budget)) else cell)
            lines.append(f"| {a.name} | " + " | ".join(cells) + " |")
    ordered = [a for a in ARCHS if a.group == "ordering" or a.name in ("mor-expert-3", "recursive-3")]
    rows = [(a, best[(a.name, ORDERING_BUDGET)]) for a in ordered if (a.name, ORDERING_BUDGET) in best]
    if rows:
        lines += ["", f"## The paper's orderings at {sci(ORDERING_BUDGET)} FLOPs, each at its best LR", "",
                  "| model | what | best LR | val NLL | val NLL (causal) | WikiText-2 NLL | routers (last logged step) |",
                  "|---|---|---|---:|---:|---:|---|"]
        lines += [f"| {a.name} | {a.what} | {best_lr(e)} | {fmt(e['val_nll'])} | {fmt(e['val_nll_causal'])} | "
                  f"{fmt(e['wikitext2_nll'])} | {router_summary(e['router'])} |" for a, e in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.md"]
    written[0].write_text("\n".join(lines) + "\n")
    for budget in BUDGETS:
        path = out_dir / f"nll_vs_lr_{sci(budget)}.png"
        if plot_nll_vs_lr([e for e in finished if e["budget"] == budget], compared, budget, path):
            written.append(path)
    if best and plot_nll_vs_flops(best, compared, out_dir / "nll_vs_flops.png"):
        written.append(out_dir / "nll_vs_flops.png")
    return written


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_nll_vs_lr(entries: list[dict[str, Any]], archs: list[Arch], budget: float, path: Path) -> bool:
    lines = {a.name: sorted((e["lr"], e["val_nll"]) for e in entries if e["arch"] == a.name and e["state"] == "done")
             for a in archs}
    if not any(lines.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in lines.items():
        if points:
            ax.plot(*zip(*points), marker="o", label=name, linestyle="--" if arch(name).group == "control" else "-")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation NLL (corpus)",
           title=f"NLL against learning rate at {sci(budget)} forward FLOPs (diverged runs not drawn)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def plot_nll_vs_flops(best: dict[tuple[str, float], dict[str, Any]], archs: list[Arch], path: Path) -> bool:
    """Each model at its best LR per budget, at the FLOPs it actually spent (the step-matched vanilla spends
    more than its budget)."""
    metrics = [("val_nll", "validation NLL (corpus)"), ("wikitext2_nll", "WikiText-2 NLL")]
    metrics = [m for m in metrics if any(e[m[0]] is not None for e in best.values())]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.4 * len(metrics), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        for a in archs:
            points = sorted((e["forward_flops"], e[key]) for (name, _), e in best.items()
                            if name == a.name and e[key] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=a.name, linestyle="--" if a.group == "control" else "-")
        ax.set(xscale="log", xlabel="forward FLOPs (the paper's count)", ylabel=label,
               title=f"{label} at each model's best LR")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--list", action="store_true", help="print the selected runs, their steps and state")
    mode.add_argument("--report", nargs="?", const="", metavar="DIR",
                      help="write report.md and the plots from the finished runs (default DIR: OUT/report)")
    mode.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # one run, started by the study itself
    parser.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                        help="runs whose name or architecture matches a glob, e.g. 'mor-*' or '*_1e15_*'")
    parser.add_argument("--budget", nargs="+", type=float, default=[], metavar="FLOPS",
                        help=f"budgets to run (default: all but the optional {', '.join(map(sci, OPTIONAL_BUDGETS))})")
    parser.add_argument("--lr", nargs="+", type=float, default=[],
                        help=f"learning rates to run: the grid's {LRS} and those the sweeps' edges added")
    parser.add_argument("--group", nargs="+", choices=("main", "control", "ordering"), default=[])
    parser.add_argument("--out", type=Path, default=Path("runs/isoflop"), help="run directories (default runs/isoflop)")
    parser.add_argument("--results", type=Path, help="the results JSON (default OUT/results.json)")
    parser.add_argument("--data", default="runs/data/corpus", help="the corpus prepared by `mor data prepare`")
    parser.add_argument("--wikitext", metavar="FILE", help="WikiText-2 validation text, scored after each run")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at once on one GPU (default 1)")
    parser.add_argument("--max-minutes", type=float, metavar="M", help="start no run after M minutes; let running "
                                                                         "ones finish")
    parser.add_argument("--steps", type=int, metavar="N", help="every run N steps instead of its budget (a short try; "
                                                               "use another --out)")
    add_set_argument(parser, "config values for every run that the grid does not set, e.g. run.compile=false")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's checkpoints")
    args = parser.parse_args(argv)
    if args.worker:
        return work(args.worker)
    for name in ("parallel", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    settings = Settings(out=args.out.resolve(), results=args.results.resolve() if args.results else None,
                        data=args.data, wikitext=args.wikitext, extra=args.overrides, steps=args.steps,
                        parallel=args.parallel, keep_checkpoints=args.keep_checkpoints)
    check_extra(settings)
    if args.report is not None:
        out_dir = Path(args.report) if args.report else settings.out / "report"
        results = load_results(settings.results_path)
        for path in report(results, plan(results), out_dir):
            print(f"wrote {path}")
        return 0
    runs = select(plan(load_results(settings.results_path)), args.only, args.budget, args.lr, args.group)
    if args.list:
        list_runs(runs, settings)
        return 0
    if not (Path(settings.data) / "index.json").is_file():
        parser.error(f"--data {settings.data}: not a folder prepared by `mor data prepare`; prepare the corpus first "
                     "(docs/results.md gives the command)")
    if settings.wikitext and not Path(settings.wikitext).is_file():
        parser.error(f"--wikitext {settings.wikitext}: no such file; give the WikiText-2 validation text or leave "
                     "the option out")
    return run_study(runs, settings, args.max_minutes)


if __name__ == "__main__":
    sys.exit(main())
