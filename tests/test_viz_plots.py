"""Plots of runs and benchmarks, and the ``mor viz`` command line."""

import json

import pytest
import torch
import yaml

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402

from mor import MoRConfig, MoRForCausalLM  # noqa: E402
from mor.cli import main  # noqa: E402
from mor.data import sample_tokenizer_path  # noqa: E402
from mor.model.flops import forward_flops_per_token  # noqa: E402
from mor.viz.bench import load_bench, normalise, plot_throughput_vs_nll  # noqa: E402
from mor.viz.runs import flops_per_token, load_run, plot_loss_curves, plot_nll_vs_flops  # noqa: E402

MODEL = dict(preset="tiny", sharing="middle_cycle", num_recursions=3, router="expert")


def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and imread(path).size > 0


def write_run(path, records, model=MODEL, seq_len=64, model_config=True):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model, "data": {"seq_len": seq_len}}))
    if model_config:
        config = dict(model)
        MoRConfig.from_preset(config.pop("preset"), **config).save(path / "model_config.json")
    return path


def full_records():
    records = []
    for step in range(10, 101, 10):
        records.append({"step": step, "tokens": step * 1024, "loss": 6 - step / 50, "lm_loss": 5.9 - step / 50,
                        "lr": 1e-3, "router/sampling_accuracy/step2": 0.9})
        if step % 50 == 0:
            records.append({"step": step, "tokens": step * 1024, "val/nll_topk": 6 - step / 60,
                            "val/nll_causal": 6.01 - step / 60})
    return records


# ---------------------------------------------------------------------------------------------- runs
def test_run_reading_tolerates_missing_keys_and_bad_lines(tmp_path):
    run = write_run(tmp_path / "r", [{"step": 1, "loss": 5.0}, {"step": 2, "val_nll": 4.0}])
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 4.\n')  # cut off by a crash
    loaded = load_run(run)
    assert len(loaded.records) == 2
    assert loaded.train_key() == "loss" and loaded.val_keys() == ["val_nll"]
    assert loaded.series("loss", "step") == ([1], [5.0])
    assert loaded.series("loss", "tokens") == ([], [])


def test_slash_and_underscore_keys_are_the_same(tmp_path):
    run = load_run(write_run(tmp_path / "r", full_records()))
    assert run.train_key() == "lm_loss"
    assert run.val_keys() == ["val_nll_topk", "val_nll_causal"]
    tokens, nll = run.series("val_nll_causal", "tokens")
    assert tokens == [50 * 1024, 100 * 1024] and nll == pytest.approx([6.01 - 50 / 60, 6.01 - 100 / 60])


def test_flops_per_token_comes_from_the_run_config(tmp_path):
    config = MoRConfig.from_preset("tiny", sharing="middle_cycle", num_recursions=3, router="expert")
    with_json = load_run(write_run(tmp_path / "a", full_records(), seq_len=64))
    assert flops_per_token(with_json) == forward_flops_per_token(config, 64)
    assert flops_per_token(with_json, seq_len=128) == forward_flops_per_token(config, 128)
    yaml_only = load_run(write_run(tmp_path / "b", full_records(), seq_len=32, model_config=False))
    assert flops_per_token(yaml_only) == forward_flops_per_token(config, 32)
    bare = tmp_path / "c"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text('{"step": 1, "loss": 3}\n')
    with pytest.raises(ValueError, match="--flops-per-token"):
        flops_per_token(load_run(bare))


def test_run_plots_write_pngs(tmp_path):
    full = load_run(write_run(tmp_path / "full", full_records()), "mor")
    sparse = load_run(write_run(tmp_path / "sparse", [{"step": 5, "loss": 5.5}, {"step": 9}]), "no tokens")
    assert is_png(plot_loss_curves([full, sparse], tmp_path / "out" / "loss.png"))
    assert is_png(plot_nll_vs_flops([full, sparse], [1e6, 2e6], tmp_path / "out" / "flops.png"))
    # Nothing to draw: no file, no exception.
    assert plot_nll_vs_flops([sparse], [1e6], tmp_path / "none.png") is None
    empty = load_run(write_run(tmp_path / "empty", [{"step": 1}]))
    assert plot_loss_curves([empty], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


# ---------------------------------------------------------------------------------------------- benchmarks
BENCH = [
    {"shape": "smollm-135m", "model": "vanilla", "batch_size": 16, "tokens_per_s": 1000.0},
    {"shape": "smollm-135m", "model": "mor-expert-3", "batch_size": 16, "tokens_per_s": 1500.0, "nll": 2.9},
    {"shape": "smollm-135m", "model": "mor-token-3", "batch_size": 16, "error": "OutOfMemoryError: ..."},
    {"shape": "smollm-135m", "batch_size": 16, "tokens_per_s": 3.0},
]


def test_bench_reading_skips_bad_records_and_normalises(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(BENCH))
    points = load_bench([path], nll={"vanilla": 2.8})
    assert [(p.name, p.throughput, p.nll) for p in points] == [("vanilla", 1000.0, 2.8), ("mor-expert-3", 1500.0, 2.9)]
    assert points[0].group == "shape=smollm-135m, batch_size=16"
    assert load_bench([path], nll={"smollm-135m/vanilla": 2.7, "vanilla": 2.8})[0].nll == 2.7
    assert load_bench([path], nll={"smollm-360m/vanilla": 2.7})[0].nll is None
    relative = normalise(points, "vanilla")
    assert [p.throughput for p in relative] == [1.0, 1.5]
    with pytest.raises(ValueError, match="baseline 'llama'"):
        normalise(points, "llama")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"records": [{"name": "a", "throughput": 2.0}]}))
    assert load_bench([wrapped])[0].unit == "throughput"


def test_bench_plot_with_and_without_nll(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(BENCH))
    assert is_png(plot_throughput_vs_nll(load_bench([path], {"vanilla": 2.8}), tmp_path / "scatter.png"))
    assert is_png(plot_throughput_vs_nll(load_bench([path], {}), tmp_path / "partial.png"))
    no_nll = [{"model": m, "tokens_per_s": s} for m, s in (("a", 1.0), ("b", 2.0))]
    path.write_text(json.dumps(no_nll))
    assert is_png(plot_throughput_vs_nll(load_bench([path]), tmp_path / "bars.png"))


# ---------------------------------------------------------------------------------------------- command line
def test_cli_runs_and_bench(tmp_path, capsys):
    a = write_run(tmp_path / "a", full_records())
    b = write_run(tmp_path / "b", [{"step": 1, "tokens": 10, "loss": 5.0}], model={"preset": "tiny"})
    assert main(["viz", "runs", str(a), str(b), "--out", str(tmp_path / "plots"), "--names", "MoR", "vanilla"]) == 0
    assert is_png(tmp_path / "plots" / "loss_curves.png") and is_png(tmp_path / "plots" / "nll_vs_flops.png")
    assert f"vanilla: {forward_flops_per_token(MoRConfig.from_preset('tiny'), 64):.4g}" in capsys.readouterr().out
    assert main(["viz", "runs", str(a), "--out", str(tmp_path), "--flops-per-token", "1", "2"]) == 2
    assert "one value or one per run" in capsys.readouterr().err

    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    assert main(["viz", "bench", str(bench), "--out", str(tmp_path / "plots"), "--nll", "vanilla=2.8",
                 "--baseline", "vanilla"]) == 0
    assert "mor-expert-3 [shape=smollm-135m, batch_size=16]: 1.5 relative to vanilla, NLL 2.9000" in \
        capsys.readouterr().out
    assert is_png(tmp_path / "plots" / "throughput_vs_nll.png")
    assert main(["viz", "bench", str(bench), "--out", str(tmp_path), "--nll", "vanilla"]) == 2
    assert main(["viz", "runs", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_cli_depth_and_stats(tmp_path, capsys):
    torch.manual_seed(0)
    config = MoRConfig.from_preset("tiny", vocab_size=4096, sharing="middle_cycle", num_recursions=3, router="expert")
    checkpoint = tmp_path / "ckpt"
    MoRForCausalLM(config).save_pretrained(checkpoint)
    tokenizer = str(sample_tokenizer_path())
    out = tmp_path / "depth"
    assert main(["viz", "depth", str(checkpoint), "--tokenizer", tokenizer, "--text", "To be, or not to be",
                 "--routing", "causal", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.startswith("causal: ") and str(out / "depth.json") in printed.err
    assert "routing: causal" in (out / "depth.html").read_text() and is_png(out / "depth.png")
    missing = tmp_path / "missing.txt"
    assert main(["viz", "depth", str(checkpoint), "--tokenizer", tokenizer, "--text-file", str(missing),
                 "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: --text-file {missing} does not exist; give a UTF-8 text file, or the "
                                       "text itself with --text\n")

    text = tmp_path / "text.txt"
    text.write_text("Now is the winter of our discontent made glorious summer by this sun of York. " * 20)
    stats = tmp_path / "stats"
    assert main(["viz", "stats", str(checkpoint), "--tokenizer", tokenizer, "--data", str(text), "--rows", "2",
                 "--seq-len", "32", "--routing", "topk", "--no-scaling", "--out", str(stats)]) == 0
    metrics = json.loads((stats / "routing_metrics.json").read_text())["modes"]["topk"]
    assert metrics["rows"] == 2 and metrics["seq_len"] == 32
    summary = capsys.readouterr().out.splitlines()  # a summary: the numbers are in the files
    assert len(summary) == 2 and summary[1].startswith(f"topk: NLL {metrics['nll']:.3f}, mean depth ")
    assert not (stats / "depth_scaling.json").exists()
    assert main(["viz", "stats", str(checkpoint), "--tokenizer", tokenizer, "--data", str(text),
                 "--seq-len", "100000", "--out", str(stats)]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err
