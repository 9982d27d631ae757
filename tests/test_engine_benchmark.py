import importlib.util
import json
import sys

import pytest
import torch
from helpers import REPO_ROOT

from mor import MoRConfig, MoRForCausalLM


def load_benchmark():
    path = REPO_ROOT / "benchmarks" / "decode_throughput.py"
    spec = importlib.util.spec_from_file_location("decode_throughput", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_calibrated_routers_send_a_third_of_tokens_to_each_depth():
    bench = load_benchmark()
    torch.manual_seed(0)
    model = MoRForCausalLM(MoRConfig.from_preset("tiny-8l", sharing="middle_cycle", num_recursions=3,
                                                 router="expert")).eval()
    bench.calibrate_exits(model, rows=8, seq_len=128, seed=0)
    with torch.no_grad():
        depths = model(torch.randint(0, 256, (8, 128)), routing="causal").depths  # fresh tokens
    shares = torch.bincount(depths.flatten(), minlength=4)[1:].float() / depths.numel()
    torch.testing.assert_close(shares, torch.full((3,), 1 / 3), atol=0.06, rtol=0)


def test_kv_expectations_match_the_paper_ratios():
    bench = load_benchmark()
    for nr in (2, 3, 4):
        cfg = MoRConfig.from_preset("smollm-360m", sharing="middle_cycle", num_recursions=nr, router="expert")
        assert bench.block_ratio_target(cfg) == pytest.approx((nr + 1) / (2 * nr))
        block = cfg.recursion_block_size
        assert bench.block_entries_per_token(cfg) == pytest.approx(block * (nr + 1) / 2)
        assert bench.block_ratio_target(cfg.replace(kv_cache="share")) == pytest.approx(1 / nr)
        assert bench.relative_max_batch(cfg.replace(kv_cache="share"), 32) == 32 * nr


def test_relative_max_batch_is_the_papers():
    bench = load_benchmark()
    for nr, batch in ((2, 42), (3, 48), (4, 51)):  # MOR_SPEC 7.3
        cfg = MoRConfig.from_preset("smollm-360m", sharing="middle_cycle", num_recursions=nr, router="expert")
        assert bench.relative_max_batch(cfg, 32) == batch
    assert bench.relative_max_batch(MoRConfig.from_preset("smollm-360m"), 32) == 32


def test_quick_cpu_run_writes_every_model_and_the_baselines(tmp_path):
    pytest.importorskip("transformers")
    bench = load_benchmark()
    records = bench.main(["--device", "cpu", "--quick", "--requests", "6", "--mean-tokens", "6", "--std-tokens", "1",
                          "--models", "vanilla,mor-3-share", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "decode_throughput.json").read_text())
    assert saved["results"] == json.loads(json.dumps(records))
    by = {(r["model"], r["batch_size"]): r for r in records}
    assert set(by) == {(m, s) for m in ("vanilla", "hf-static", "mor-3-share") for s in ("4", "max")}
    requested = sum(bench.generation_lengths(6, 6, 1, 0))
    for r in records:  # a rate is the tokens over the time; our engine serves every request in full
        assert "error" not in r and r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"]), r
        assert r["model"].startswith("hf-") or r["tokens"] == requested, r
    for size in ("4", "max"):  # speedups are against our vanilla model at the same batch size
        assert by["vanilla", size]["speedup"] == 1.0
        assert by["mor-3-share", size]["speedup"] == pytest.approx(
            by["mor-3-share", size]["tokens_per_s"] / by["vanilla", size]["tokens_per_s"])
    shared = by["mor-3-share", "max"]
    assert shared["kv_block_ratio"] == pytest.approx(1 / 3)
    assert shared["batch"] == 12  # sharing: the block keeps 1/3 of its entries, so 4 sequences become 12
    assert 1 < shared["mean_depth"] < 3 and "calibrated" in shared["exits"]


def test_the_prefill_benchmark_compares_both_paths_on_the_cpu(tmp_path):
    path = REPO_ROOT / "benchmarks" / "prefill_host.py"
    spec = importlib.util.spec_from_file_location("prefill_host", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # it imports decode_throughput
    try:
        spec.loader.exec_module(module)
        records = module.main(["--device", "cpu", "--shape", "tiny", "--models", "vanilla,mor-3", "--prompts", "2",
                               "--tokens", "16", "--ragged", "--repeats", "1", "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(path.parent))
    by = {(r["model"], r["path"]): r for r in records}
    for model in ("vanilla", "mor-3"):
        assert by[model, "prompt batch"]["operations"] < by[model, "per-layer"]["operations"]
        assert by[model, "prompt batch"]["ms"] > 0
    assert json.loads((tmp_path / "prefill_host.json").read_text())["results"] == records


def test_the_host_time_benchmark_times_every_part_of_a_round_trip(tmp_path):
    path = REPO_ROOT / "benchmarks" / "engine_host.py"
    spec = importlib.util.spec_from_file_location("engine_host", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # it imports decode_throughput and prefill_host
    try:
        spec.loader.exec_module(module)
        parts = module.main(["--device", "cpu", "--rows", "8", "--requests", "24", "--tokens", "4,8",
                             "--out", str(tmp_path)])
    finally:
        sys.path.remove(str(path.parent))
    assert set(parts) == set(module.PARTS)
    for name in ("engine._admit", "scheduler.window", "runner.launch", "engine._collect", "runner.release"):
        assert parts[name]["calls"] > 0 and parts[name]["ms_per_call"] > 0, name
    saved = json.loads((tmp_path / "engine_host.json").read_text())
    assert saved["parts"] == parts and saved["meta"]["tokens"] >= 24 * 4
