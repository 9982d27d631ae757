"""scripts/isoflop_study.py on CPU: the grid, its controls, selection, resume, collection, report, a tiny run."""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT

from mor import MoRForCausalLM
from mor.cli import main as mor_main

_spec = importlib.util.spec_from_file_location("isoflop_study", REPO_ROOT / "scripts" / "isoflop_study.py")
study = importlib.util.module_from_spec(_spec)
sys.modules["isoflop_study"] = study  # dataclasses resolve their module by name
_spec.loader.exec_module(study)

REQUIRED_BUDGETS = (1e15, 3e15)
# A 14-layer model of width 32 and 32-token rows: the grid's architectures, trained in seconds on a CPU.
TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "model.vocab_size=4096", "model.max_position_embeddings=64", "data.seq_len=32",
        "batch.micro_batch_size=2", "batch.grad_accum=1", "run.eval_batches=1", "run.log_every=1",
        "run.compile=false"]


def run_of(arch: str, budget: float = 1e15, lr: float = 3e-3):
    return study.Run(study.arch(arch), budget, lr)


def model_config(run, settings=None):
    settings = settings or study.Settings()
    spec = study.spec(run, settings)
    return study.load(spec["config"], spec["overrides"], settings).model_config()


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory) -> Path:
    from mor.data import prepare_sample

    out = tmp_path_factory.mktemp("sample") / "data"
    prepare_sample(out, progress=False)
    return out


# ---------------------------------------------------------------------------------------------------- the grid
def test_the_grid_holds_what_the_study_claims():
    runs = study.grid()
    assert len({r.name for r in runs}) == len(runs)
    for group in ("main", "control"):
        archs = [a for a in study.ARCHS if a.group == group]
        assert len(archs) >= 2
        for a in archs:
            for budget in REQUIRED_BUDGETS:
                assert len({r.lr for r in runs if r.arch == a and r.budget == budget}) >= 4, (a.name, budget)
    assert {a.name for a in study.ARCHS if a.group == "main"} == {"vanilla", "recursive-3", "mor-expert-3"}
    # The orderings at one budget: Nr 2/3/4, expert vs token choice, caching vs KV sharing, Middle-Cycle vs Cycle.
    at = study.ORDERING_BUDGET
    configs = [model_config(r) for r in runs if r.budget == at and r.arch.group in ("ordering", "main")
               and r.lr == study.LRS[0]]
    routed = [c for c in configs if c.router != "none"]
    assert {c.num_recursions for c in routed if c.router == "expert"} == {2, 3, 4}
    assert {c.router for c in routed} == {"expert", "token"}
    assert {c.kv_cache for c in routed} == {"recursion", "share"}
    assert {c.sharing for c in routed} == {"middle_cycle", "cycle"}
    assert {c.sharing for c in configs if c.router == "none" and c.num_recursions == 3} == {"middle_cycle", "cycle"}


def test_every_run_config_loads_and_keeps_the_grid_lr_and_budget():
    for run in study.grid():
        spec = study.spec(run, study.Settings())
        config = study.load(spec["config"], spec["overrides"], study.Settings())
        config.model_config()  # validated
        assert config.optim.lr == run.lr
        if run.arch.steps_of is None:
            assert config.budget.flops == run.budget and config.budget.steps is None
        assert spec["tokens"] == spec["steps"] * 64 * 1024  # configs/small/: 65,536 tokens per step


def test_flop_budgets_give_the_steps_of_the_earlier_runs():
    # docs/results/small/ holds the metrics of the earlier 3e15 runs of these configs: their last step.
    for name in ("vanilla", "recursive-3", "mor-expert-3"):
        lines = (REPO_ROOT / "docs" / "results" / "small" / name / "metrics.jsonl").read_text().splitlines()
        trained = json.loads(lines[-1])["step"]
        assert study.spec(run_of(name, 3e15), study.Settings())["steps"] == trained, name
    assert trained == 597


@pytest.mark.parametrize("arch", ["vanilla", "mor-expert-3", "recursive-3-gated", "vanilla-steps",
                                  "mor-expert-3-kvshare", "mor-expert-3-cycle"])
def test_planned_steps_are_what_mor_train_resolves(arch, sample_data, tmp_path, capsys):
    run = run_of(arch, 1e15)
    spec = study.spec(run, study.Settings())
    code = mor_main(["train", str(REPO_ROOT / spec["config"]), "--set", *spec["overrides"],
                     f"data.path={sample_data}", f"run.out_dir={tmp_path / 'run'}", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.search(r"budget: ([\d,]+) steps", out).group(1).replace(",", "") == str(spec["steps"])


# ---------------------------------------------------------------------------------------------------- controls
def test_gated_control_is_recursive_3_with_the_gate_and_full_depth():
    control, recursive = model_config(run_of("recursive-3-gated")), model_config(run_of("recursive-3"))
    assert control.router == "expert" and control.step_capacities == [1.0, 1.0, 1.0] and control.gate_alpha == 0.1
    routing_fields = {"router", "router_arch", "router_func", "router_alpha", "capacities", "expert_sampling",
                      "aux_loss_coeff", "capacity_warmup_steps"}
    same = {f.name for f in dataclasses.fields(control)} - routing_fields
    assert {k: getattr(control, k) for k in same} == {k: getattr(recursive, k) for k in same}
    for budget in REQUIRED_BUDGETS:  # full depth costs recursive-3's FLOPs per token: the same steps
        assert study.spec(run_of("recursive-3-gated", budget), study.Settings())["steps"] == \
            study.spec(run_of("recursive-3", budget), study.Settings())["steps"]


def tiny(config):
    return config.replace(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                          vocab_size=64, max_position_embeddings=64)


@torch.no_grad()
def test_capacities_of_one_route_every_token_through_every_recursion():
    ids = torch.randint(0, 64, (2, 48))
    control = MoRForCausalLM(tiny(model_config(run_of("recursive-3-gated")))).eval()
    for routing in ("topk", "causal"):
        assert (control(ids, routing=routing).depths == 3).all(), routing
    mor = MoRForCausalLM(tiny(model_config(run_of("mor-expert-3")))).eval()
    assert not (mor(ids, routing="topk").depths == 3).all()  # MoR's capacities do stop tokens early
    # Same weights as recursive-3 but for the routers: the logits differ only through the gated update.
    recursive = MoRForCausalLM(tiny(model_config(run_of("recursive-3")))).eval()
    missing, unexpected = control.load_state_dict(recursive.state_dict(), strict=False)
    assert not unexpected and missing and all("expert." in name for name in missing)
    assert not torch.allclose(control(ids, routing="topk").logits, recursive(ids).logits, atol=1e-3)


def test_step_matched_vanilla_trains_mor_steps():
    for budget in REQUIRED_BUDGETS:
        steps = {name: study.spec(run_of(name, budget), study.Settings())["steps"]
                 for name in ("vanilla", "vanilla-steps", "mor-expert-3")}
        assert steps["vanilla-steps"] == steps["mor-expert-3"] > steps["vanilla"]
    assert model_config(run_of("vanilla-steps")) == model_config(run_of("vanilla"))


# ---------------------------------------------------------------------------------------------------- selection
def test_selection_by_name_budget_lr_and_group():
    runs = study.grid()
    chosen = study.select(runs, only=["mor-expert-3"])
    assert {r.arch.name for r in chosen} == {"mor-expert-3"} and {r.budget for r in chosen} == set(REQUIRED_BUDGETS)
    assert {r.budget for r in study.select(runs, budgets=[1e16])} == {1e16}  # optional: only when asked
    chosen = study.select(runs, only=["*_1e15_lr3e-3"], groups=["control"])
    assert sorted(r.name for r in chosen) == ["recursive-3-gated_1e15_lr3e-3", "vanilla-steps_1e15_lr3e-3"]
    assert {r.lr for r in study.select(runs, lrs=[0.003])} == {3e-3}
    with pytest.raises(SystemExit, match="no run of the grid matches"):
        study.select(runs, only=["nothing-*"])


@pytest.mark.parametrize("pair", ["optim.lr=1e-3", "budget.steps=5", "model.capacities=[1.0, 1.0, 1.0]",
                                  "data.path=x"])
def test_a_set_of_what_the_grid_sets_is_refused(pair):
    with pytest.raises(SystemExit, match="the grid .* sets it"):
        study.check_extra(study.Settings(extra=[pair]))
    study.check_extra(study.Settings(extra=["run.compile=false"]))


def test_set_is_the_mor_option(capsys):
    with pytest.raises(SystemExit) as exit_:  # a pair without "=" is a usage error while parsing, as in mor train
        study.main(["--list", "--set", "run.compile"])
    assert exit_.value.code == 2 and "--set: expected KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--set optim.lr: the grid"):  # repeated --set, keys read as mor reads them
        study.main(["--list", "--set", "run.compile=false", "--set", " optim.lr = 1e-3"])


# ---------------------------------------------------------------------------------------------------- collection
def write_run_dir(run_dir: Path, spec: dict, state: str, val_steps: tuple[int, ...] = (2, 4)) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / study.JOB_FILE).write_text(json.dumps({"spec": spec}))
    (run_dir / study.STATUS_FILE).write_text(json.dumps({"state": state, "train_s": 30.0, "eval_s": 5.0}))
    (run_dir / "run.json").write_text(json.dumps({"steps": 4, "tokens": 400, "forward_flops": 4e10,
                                                   "forward_flops_per_token": 1e8, "non_embedding_parameters": 7}))
    records = []
    for step in range(1, 5):
        records.append({"step": step, "tokens": 100 * step, "loss": 5.0 - step, "lm_loss": 5.0 - step,
                        "tokens_per_s": 10.0 if step == 1 else 100.0 * step, "router/sampling_accuracy/step2": 0.9,
                        "router/dead_token_ratio": 0.01 * step})
        if step in val_steps:
            records.append({"step": step, "tokens": 100 * step, "val/nll_topk": 4.0 - step / 4 + (step == 4),
                            "val/nll_causal": 4.5 - step / 4})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_the_collector_reads_a_run_directory(tmp_path):
    run = run_of("mor-expert-3")
    spec = {"config": "c", "overrides": [], "steps": 4, "tokens": 400}
    write_run_dir(tmp_path / "a", spec, "done")
    (tmp_path / "a" / study.WIKITEXT_FILE).write_text(json.dumps({"results": [
        {"metric": "nll", "routing": "topk", "value": 9.0}, {"metric": "token_nll", "routing": "topk", "value": 5.5},
        {"metric": "token_nll", "routing": "causal", "value": 5.6}]}))
    entry = study.collect(run, tmp_path / "a")
    assert entry["state"] == "done" and entry["spec"] == spec
    assert entry["val_nll"] == 4.0 and entry["val_nll_causal"] == 3.5  # the final validation, at step 4
    assert entry["best_val_nll"] == 3.5 and entry["val_curve"] == [[2, 3.5], [4, 4.0]]
    assert entry["wikitext2_nll"] == 5.5 and entry["wikitext2_nll_causal"] == 5.6
    assert entry["router"] == {"sampling_accuracy/step2": 0.9, "dead_token_ratio": 0.04}
    assert entry["tokens_per_s"] == 300.0  # median of steps 2-4: step 1 includes compilation
    assert (entry["steps"], entry["tokens"], entry["forward_flops"], entry["lr"]) == (4, 400, 4e10, 3e-3)
    # Stopped at step 4 before its final validation: no final NLL, the curve so far.
    write_run_dir(tmp_path / "b", spec, "stopped", val_steps=(2,))
    entry = study.collect(run, tmp_path / "b")
    assert entry["state"] == "stopped" and entry["val_nll"] is None and entry["best_val_nll"] == 3.5
    # The stop signal's checkpoint, after the last logged step, counts once complete (its manifest written last);
    # a checkpoint cut off while being written does not.
    checkpoints = tmp_path / "b" / "checkpoints"
    (checkpoints / "step_00000005").mkdir(parents=True)
    (checkpoints / "step_00000005" / "manifest.json").write_text("{}")
    (checkpoints / "step_00000006").mkdir()
    assert study.collect(run, tmp_path / "b")["step_reached"] == 5
    assert study.collect(run, tmp_path / "never-started") is None


def test_results_json_is_replaced_atomically(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    study.write_json_atomic(path, {"runs": {"a": 1}})

    def intact() -> bool:  # the old results, and no temporary file beside them
        return json.loads(path.read_text()) == {"runs": {"a": 1}} and [p.name for p in tmp_path.iterdir()] == [path.name]

    with pytest.raises(TypeError):  # not serialisable: nothing is written
        study.write_json_atomic(path, {"runs": {"a": object()}})
    assert intact()
    write_text = Path.write_text

    def disk_full_half_way(self, text, *args, **kwargs):
        write_text(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", disk_full_half_way)
        with pytest.raises(OSError, match="No space left"):
            study.write_json_atomic(path, {"runs": {"a": 2, "b": 3}})
    assert intact()

    def cannot_rename(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with monkeypatch.context() as patch:
        patch.setattr(study.os, "replace", cannot_rename)
        with pytest.raises(OSError, match="cross-device"):
            study.write_json_atomic(path, {"runs": {"a": 2}})
    assert intact()
    study.write_json_atomic(path, {"runs": {"a": 2}})
    assert json.loads(path.read_text()) == {"runs": {"a": 2}} and len(list(tmp_path.iterdir())) == 1


class Exited:
    """A worker process that has already ended."""

    returncode = 0

    def poll(self) -> int:
        return 0


def test_finished_runs_are_skipped_and_unfinished_ones_started_again(tmp_path, monkeypatch):
    settings = study.Settings(out=tmp_path, parallel=2)
    done, diverged, stopped, fresh = (run_of("vanilla", 1e15, lr) for lr in study.LRS)
    results = {"runs": {r.name: {"spec": study.spec(r, settings), "state": state, "name": r.name}
                        for r, state in ((done, "done"), (diverged, "diverged"))}}
    study.write_json_atomic(settings.results_path, results)
    write_run_dir(tmp_path / "runs" / stopped.name, study.spec(stopped, settings), "stopped", val_steps=(2,))
    started = []

    def launch(run, spec, settings):  # a worker that finishes a fresh run and leaves the stopped one as it was
        started.append(run.name)
        if run == fresh:
            write_run_dir(settings.out / "runs" / run.name, spec, "done")
        return Exited()

    monkeypatch.setattr(study, "launch", launch)
    assert study.run_study([done, diverged, stopped, fresh], settings, max_minutes=None) == 0
    assert started == [stopped.name, fresh.name]
    saved = json.loads(settings.results_path.read_text())["runs"]
    assert [saved[r.name]["state"] for r in (done, diverged, stopped, fresh)] == ["done", "diverged", "stopped", "done"]
    # A result made by another grid (here: another number of steps) is refused, not silently reused.
    with pytest.raises(SystemExit, match="differs from the grid's run"):
        study.run_study([done], study.Settings(out=tmp_path, steps=3), max_minutes=None)


def test_no_run_starts_past_the_deadline(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(study, "launch", lambda run, spec, settings: started.append(run.name) or Exited())
    assert study.run_study([run_of("vanilla")], study.Settings(out=tmp_path), max_minutes=0) == 0
    assert started == []


# ---------------------------------------------------------------------------------------------------- worker
def worker_dir(tmp_path: Path, wikitext: str | None = None) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_00000004").mkdir(parents=True)
    spec = {"config": "configs/small/vanilla.yaml", "overrides": [], "steps": 4, "tokens": 4}
    study.write_json_atomic(run_dir / study.JOB_FILE, {
        "spec": spec, "config": str(REPO_ROOT / spec["config"]), "overrides": ["data.path=x"], "steps": 4,
        "wikitext": wikitext, "seq_len": 8, "eval_batch_size": 2, "keep_checkpoints": False})
    return run_dir


def test_the_worker_resumes_and_records_a_divergence_as_final(tmp_path, monkeypatch):
    import mor.train
    from mor.train import TrainingDiverged, TrainResult

    calls = []

    def stopped(config, resume):
        calls.append(resume)
        return TrainResult(step=2, tokens=2, loss=1.0, stopped_by="SIGTERM")

    run_dir = worker_dir(tmp_path)
    monkeypatch.setattr(mor.train, "train", stopped)
    assert study.work(run_dir) == 0 and calls == ["latest"]  # from the last checkpoint, or fresh if none
    status = json.loads((run_dir / study.STATUS_FILE).read_text())
    assert status["state"] == "stopped" and not status["trained"] and (run_dir / "checkpoints").is_dir()

    def diverges(config, resume):
        raise TrainingDiverged("the loss is nan at step 3")

    monkeypatch.setattr(mor.train, "train", diverges)
    assert study.work(run_dir) == 0
    status = json.loads((run_dir / study.STATUS_FILE).read_text())
    assert status["state"] == "diverged" and "nan" in status["error"] and not (run_dir / "checkpoints").exists()


def test_a_failed_evaluation_is_retried_without_training_again(tmp_path, monkeypatch):
    import mor.train
    from mor.train import TrainResult

    trained = []
    monkeypatch.setattr(mor.train, "train", lambda config, resume: trained.append(1) or TrainResult(4, 4, 1.0))
    run_dir = worker_dir(tmp_path, wikitext=str(tmp_path / "missing.txt"))
    monkeypatch.setattr(study.subprocess, "run", lambda command, cwd: subprocess.CompletedProcess(command, 2))
    assert study.work(run_dir) == 1
    status = json.loads((run_dir / study.STATUS_FILE).read_text())
    assert status["state"] == "failed" and "mor eval" in status["error"] and status["trained"]

    def evaluates(command, cwd):
        Path(command[command.index("--out") + 1]).write_text(json.dumps({"results": []}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(study.subprocess, "run", evaluates)
    assert study.work(run_dir) == 0 and trained == [1]
    assert json.loads((run_dir / study.STATUS_FILE).read_text())["state"] == "done"


# ---------------------------------------------------------------------------------------------------- report
def synthetic_results() -> dict:
    """NLL = base + (log2(lr / optimum))^2 / 10 per architecture; one diverged and one missing run."""
    import math

    optimum = {"vanilla": 1.5e-3, "recursive-3": 7.5e-4, "mor-expert-3": 6e-3, "recursive-3-gated": 3e-3,
               "vanilla-steps": 1.5e-3, "mor-token-3": 3e-3, "mor-expert-2": 3e-3}
    base = {"vanilla": 4.5, "recursive-3": 4.6, "mor-expert-3": 4.0, "recursive-3-gated": 4.3, "vanilla-steps": 4.4,
            "mor-token-3": 4.2, "mor-expert-2": 3.9}
    runs = {}
    for run in study.grid():
        name = run.arch.name
        if name not in optimum or run.budget == 1e16 or run.name == "recursive-3_3e15_lr1.5e-3":
            continue
        state = "diverged" if run.name == "vanilla_1e15_lr6e-3" else "done"
        nll = base[name] - (run.budget == 3e15) * 0.4 + math.log2(run.lr / optimum[name]) ** 2 / 10
        router = {"sampling_accuracy/step1": 1.0, "sampling_accuracy/step2": 0.971, "sampling_accuracy/step3": 0.948,
                  "dead_token_ratio": 0.0} if name.startswith("mor-expert") else {}
        runs[run.name] = {"name": run.name, "arch": name, "group": run.arch.group, "budget": run.budget,
                          "lr": run.lr, "state": state, "val_nll": None if state == "diverged" else nll,
                          "val_nll_causal": nll + 0.01 if name.startswith("mor") else None,
                          "wikitext2_nll": nll + 1.0, "steps": 100, "tokens": 6_553_600,
                          "forward_flops": run.budget * (1.4 if name == "vanilla-steps" else 1.0), "router": router}
    return {"runs": runs}


def test_the_report_picks_each_model_at_its_best_lr(tmp_path):
    pytest.importorskip("matplotlib")  # the plots need the viz extra
    written = study.report(synthetic_results(), study.grid(), tmp_path)
    assert sorted(p.name for p in written) == ["nll_vs_flops.png", "nll_vs_lr_1e15.png", "nll_vs_lr_3e15.png",
                                               "report.md"]
    for path in written[1:]:
        assert path.read_bytes().startswith(b"\x89PNG")
    text = (tmp_path / "report.md").read_text()
    assert "| 1e15 | vanilla | 1.5e-3 | 4/4 | 4.500 | – | 5.500 |" in text  # one diverged run counts as finished
    assert "| 1e15 | mor-expert-3 | 6e-3 (edge) | 4/4 | 4.000 | 4.010 | 5.000 |" in text
    assert "| 3e15 | recursive-3 | 7.5e-4 (edge) | 3/4 | 4.200 |" in text
    assert "| vanilla | 4.600 | **4.500** | 4.600 | diverged |" in text
    assert "| 1e15 | vanilla-steps | 1.5e-3 | 4/4 | 4.400 | – | 5.400 | 100 | 6.6M | 1.4e15 |" in text
    assert "| mor-expert-2 | MoR, expert-choice, Nr=2 | 3e-3 | 3.900 | 3.910 | 4.900 | sampling accuracy " \
           "100.0 / 97.1 / 94.8%, dead tokens 0.0% |" in text
    assert "47 of the grid's 72 runs have finished (1 diverged), and 0 of the 12 optional ones at 1e16" in text


def test_a_sweep_best_at_its_edge_is_extended_until_its_best_lies_inside(tmp_path):
    def results(nll_of_lr: dict[float, float | None], arch: str = "vanilla") -> dict:
        return {"runs": {run_of(arch, 1e15, lr).name: {
            "arch": arch, "budget": 1e15, "lr": lr, "state": "training" if nll is None else "done", "val_nll": nll}
            for lr, nll in nll_of_lr.items()}}

    def extensions(res: dict) -> list[str]:
        return [r.name for r in study.plan(res) if r not in study.grid()]

    low = dict(zip(study.LRS, (5.0, 5.2, 5.4, 5.6)))
    assert extensions(results(low)) == ["vanilla_1e15_lr3.75e-4"]
    assert extensions(results({**low, 6e-3: None})) == []  # not all of the sweep has finished
    assert extensions(results(dict(zip(study.LRS, (5.6, 5.4, 5.2, 5.0))), "recursive-3")) == [
        "recursive-3_1e15_lr1.2e-2"]
    assert extensions(results(dict(zip(study.LRS, (5.2, 5.0, 5.4, 5.6))))) == []  # bracketed
    # A finished extension that is best again asks for the next; one that is not ends the sweep.
    assert extensions(results({**low, 3.75e-4: 4.9})) == ["vanilla_1e15_lr3.75e-4", "vanilla_1e15_lr1.875e-4"]
    assert extensions(results({**low, 3.75e-4: 5.1})) == ["vanilla_1e15_lr3.75e-4"]
    # The report's sweep table gains the extension's column, and its best is no longer flagged as an edge.
    res = results({**low, 3.75e-4: 5.1})
    for entry in res["runs"].values():
        entry.update(name=next(n for n, e in res["runs"].items() if e is entry), group="main", val_nll_causal=None,
                     wikitext2_nll=None, steps=139, tokens=9_109_504, forward_flops=1e15, router={})
    pytest.importorskip("matplotlib")  # the report's plots need the viz extra
    study.report(res, study.plan(res), tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| 1e15 | vanilla | 7.5e-4 | 5/5 | 5.000 |" in text
    assert "| model | 3.75e-4 | 7.5e-4 | 1.5e-3 | 3e-3 | 6e-3 |" in text
    assert "| vanilla | 5.100 | **5.000** | 5.200 | 5.400 | 5.600 |" in text


def test_the_report_of_no_finished_run_still_writes_its_page(tmp_path):
    assert [p.name for p in study.report({"runs": {}}, study.grid(), tmp_path)] == ["report.md"]


# ---------------------------------------------------------------------------------------------------- end to end
def test_a_tiny_study_runs_resumes_and_reports(sample_data, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # its report draws the plots (the viz extra)
    wikitext = tmp_path / "wikitext.txt"
    wikitext.write_text("The tower stands by the sea . <unk> rain falls on the hills .\n" * 40)
    args = ["--only", "mor-expert-3_1e15_lr3e-3", "vanilla-steps_1e15_lr3e-3", "--out", str(tmp_path / "study"),
            "--data", str(sample_data), "--parallel", "2", "--set", *TINY]
    assert study.main([*args, "--steps", "2", "--wikitext", str(wikitext)]) == 0
    results = json.loads((tmp_path / "study" / "results.json").read_text())["runs"]
    assert set(results) == {"mor-expert-3_1e15_lr3e-3", "vanilla-steps_1e15_lr3e-3"}
    for name, entry in results.items():
        assert entry["state"] == "done" and entry["steps"] == 2, (name, entry["error"])
        assert 0 < entry["val_nll"] < 20 and 0 < entry["wikitext2_nll"] < 20
        assert not (tmp_path / "study" / "runs" / name / "checkpoints").exists()
    # The routers' statistics of the last logged step. Expert choice with capacities 1, 2/3 and 1/3 of each
    # 32-token row selects floor(c * 32) = 32, 21 and 10 tokens, each a fraction of those that took the step
    # before; the causal decisions agree with that top-k selection on some fraction of the tokens.
    router = results["mor-expert-3_1e15_lr3e-3"]["router"]
    assert [router[f"selected_fraction/step{k}"] for k in (1, 2, 3)] == pytest.approx([1.0, 21 / 32, 10 / 21])
    assert all(0 <= router[f"sampling_accuracy/step{k}"] <= 1 for k in (1, 2, 3))
    assert 0 <= router["dead_token_ratio"] <= 1 and results["vanilla-steps_1e15_lr3e-3"]["router"] == {}
    capsys.readouterr()
    assert study.main([*args, "--steps", "2"]) == 0  # nothing left to do
    assert "2 of 2 selected runs finished; 0 to run" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="differs from the grid's run"):  # 2-step runs are not the study's runs
        study.main(args)
    assert study.main(["--report", str(tmp_path / "report"), "--out", str(tmp_path / "study")]) == 0
    assert "| 1e15 | mor-expert-3 | 3e-3 (edge) | 1/4 |" in (tmp_path / "report" / "report.md").read_text()
