"""Routing analysis: metrics on hand-made examples, traces against the model's own statistics, depth scaling,
depth-coloured text and the statistics report."""

import html
import json
import math
import re

import pytest
import torch
from helpers import make, scale_routers, tokens

pytest.importorskip("matplotlib")

from mor import MoRForCausalLM  # noqa: E402
from mor.data import load_tokenizer, sample_tokenizer_path  # noqa: E402
from mor.viz import depth_tokens, metrics  # noqa: E402
from mor.viz.depth_text import DepthSection, depth_html, depth_png, token_pieces  # noqa: E402
from mor.viz.report import depth_text_report, routing_stats_report  # noqa: E402
from mor.viz.trace import depth_scaling, trace  # noqa: E402


def decisive(variant: str, **overrides) -> MoRForCausalLM:
    """Routers with large weights, whose decisions lie far from the threshold."""
    return scale_routers(make(variant, **overrides), 300)


# ---------------------------------------------------------------------------------------------- hand-made metrics
def test_depth_counts_by_token_match_a_hand_count():
    ids = torch.tensor([[5, 6, 5, 7, 5], [6, 6, 7, 5, 9]])
    depths = torch.tensor([[1, 2, 1, 3, 2], [2, 2, 3, 1, 1]])
    counts = depth_tokens.depth_counts_by_token(ids, depths, vocab_size=10, num_depths=3)
    assert counts[5].tolist() == [0, 3, 1, 0]
    assert counts[6].tolist() == [0, 0, 3, 0]
    assert counts[7].tolist() == [0, 0, 0, 2]
    assert counts[9].tolist() == [0, 1, 0, 0]
    assert counts.sum() == ids.numel()
    top = depth_tokens.top_tokens_per_depth(counts, k=1)
    assert top == {1: [(5, 3)], 2: [(6, 3)], 3: [(7, 2)]}
    per_depth = depth_tokens.per_depth_records(counts, str, k=2)
    assert per_depth[1][0] == {"id": 5, "token": "5", "count": 3, "share": 0.75}
    records = depth_tokens.token_records(counts, str, k=1)
    assert records[0]["id"] == 5 and records[0]["mean_depth"] == pytest.approx(5 / 4)


def test_dead_token_ratio_of_a_hand_made_batch():
    depths = torch.tensor([[3, 1, 2, 3, 1],
                           [1, 1, 3, 2, 1]])
    # Positions 0, 2 and 3 reach step 3 in some row; 1 and 4 never do.
    assert metrics.dead_token_ratio(depths, last_step=3) == pytest.approx(2 / 5)
    assert metrics.dead_token_ratio(depths, last_step=1) == 0.0


def test_sampling_accuracy_of_a_hand_made_step():
    scores = torch.tensor([[0.9, 0.2, math.nan, 0.6], [0.4, 0.5, 0.1, math.nan]])
    selected = torch.tensor([[True, False, True, False], [True, True, False, True]])
    # Entered: six tokens; agreement: yes, yes, no (0.6 >= 0.5 but not selected), no, yes (0.5 >= 0.5), yes.
    assert metrics.sampling_accuracy(scores, selected, 0.5) == pytest.approx(4 / 6)
    assert metrics.sampling_accuracy(scores, selected, 0.95) == pytest.approx(3 / 6)


def test_load_balance_and_entropy_of_hand_made_assignments():
    load, max_violation = metrics.load_balance(torch.tensor([[1, 1, 2, 3], [1, 1, 2, 3]]), num_recursions=3)
    assert load == pytest.approx([0.5, 0.25, 0.25])
    assert max_violation == pytest.approx((0.5 - 1 / 3) / (1 / 3))
    assert metrics.router_entropy(torch.full((2, 4, 3), 1 / 3)) == pytest.approx(math.log(3))
    assert metrics.router_entropy(torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.0)


# ---------------------------------------------------------------------------------------------- traces
@pytest.mark.parametrize("sampling", ["aux_loss", "aux_router"])
def test_expert_trace_metrics_equal_the_model_statistics(sampling):
    model = decisive("expert", expert_sampling=sampling)
    ids = tokens(4, 24)
    with torch.no_grad():
        out = model(ids, routing="topk")
    result = trace(model, ids, "topk", batch_size=len(ids))
    torch.testing.assert_close(result.depths, out.depths)
    stats = metrics.routing_metrics(result, 3)
    for step in (1, 2, 3):
        for name in ("sampling_accuracy", "selected_fraction"):
            key = f"{name}/step{step}"
            assert stats[key] == pytest.approx(out.router_stats[key].item(), abs=1e-6), key
    assert stats["dead_token_ratio"] == pytest.approx(out.router_stats["dead_token_ratio"].item())
    assert 0.0 < stats["sampling_accuracy/step2"] < 1.0  # a random router disagrees with top-k sometimes


def test_causal_trace_places_each_score_at_its_token():
    """In causal mode a token runs step s+1 exactly when its step-(s+1) score passes the threshold, so the scores
    the trace places at each position must reproduce the depths."""
    model = decisive("expert")
    result = trace(model, tokens(4, 24), "causal", batch_size=3)  # 3 does not divide 4 rows: a ragged last batch
    assert len(result.scores) == 3
    for step in (1, 2):  # step 0 has capacity 1: everyone runs it
        scores = result.scores[step]
        entered = result.depths >= step
        assert torch.equal(~scores.isnan(), entered)
        assert entered.any() and (result.depths > step).any()
        assert torch.equal((scores >= result.threshold) & entered, result.depths > step)
    stats = metrics.routing_metrics(result, 3)
    assert "sampling_accuracy/step2" not in stats  # measured against top-k selections only
    assert stats["selected_fraction/step2"] == pytest.approx((result.depths >= 2).float().mean().item())


def test_token_choice_trace_metrics_equal_the_model_statistics():
    model = decisive("token")
    ids = tokens(4, 24)
    with torch.no_grad():
        out = model(ids)
    result = trace(model, ids, None, batch_size=len(ids))
    assert result.probs is not None and result.probs.shape == (*ids.shape, 3)
    stats = metrics.routing_metrics(result, 3)
    assert stats["load"] == pytest.approx(out.router_stats["load"].tolist(), abs=1e-6)
    assert stats["max_violation"] == pytest.approx(out.router_stats["max_violation"].item(), abs=1e-5)
    assert stats["entropy"] == pytest.approx(out.router_stats["entropy"].item(), abs=1e-5)
    assert "sampling_accuracy/step1" not in stats


@pytest.mark.parametrize("routing", ["topk", "causal"])
def test_depth_scaling_caps_the_recursions(routing):
    model = decisive("expert")
    ids = tokens(4, 24)
    curve = depth_scaling(model, ids, routing, batch_size=2)
    assert len(curve) == model.config.num_recursions
    with torch.no_grad():
        for cap, nll in enumerate(curve, start=1):
            limit = None if cap == model.config.num_recursions else cap
            expected = model(ids, labels=ids, routing=routing, max_recursions=limit).lm_loss.item()
            assert nll == pytest.approx(expected, rel=1e-5)
    assert abs(curve[0] - curve[-1]) > 1e-5  # a random block changes little, but capping it does change the NLL


def test_depth_scaling_refuses_models_that_cannot_cap_depth():
    model = make()
    with pytest.raises(ValueError, match="sharing"):
        depth_scaling(model, tokens(4, 24))


# ---------------------------------------------------------------------------------------------- depth text
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(sample_tokenizer_path())


TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler — naïve café — to suffer"


def test_token_pieces_spell_the_text(tokenizer):
    ids, pieces = token_pieces(tokenizer, TEXT)
    assert "".join(pieces) == TEXT
    assert len(pieces) == len(ids) > 10
    assert ids == tokenizer.encode(TEXT)


def test_depth_html_marks_every_token_with_its_depth(tokenizer):
    model = decisive("expert", vocab_size=tokenizer.vocab_size)
    ids, pieces = token_pieces(tokenizer, TEXT)
    depths = trace(model, torch.tensor([ids]), "causal").depths[0].tolist()
    assert len(set(depths)) > 1
    page = depth_html([DepthSection("causal", pieces, depths)], 3, "title <&>")
    spans = re.findall(r'<span class="depth-(\d+)" title="depth (\d+)">(.*?)</span>', page, flags=re.S)
    assert [int(d) for d, _, _ in spans] == depths
    assert [int(t) for _, t, _ in spans] == depths
    assert [html.unescape(text) for _, _, text in spans] == [p.replace("\n", "↵\n") for p in pieces]
    for depth in (1, 2, 3):
        assert f".depth-{depth} {{ background:" in page
        assert f'<span class="depth-{depth}">{depth}</span>' in page  # legend
    assert "title &lt;&amp;&gt;" in page


def test_depth_text_report_writes_html_png_and_json(tokenizer, tmp_path):
    model = decisive("expert", vocab_size=tokenizer.vocab_size)
    depths = depth_text_report(model, tokenizer, TEXT, tmp_path, list(model.config.routing_modes))
    assert set(depths) == {"topk", "causal"}
    saved = json.loads((tmp_path / "depth.json").read_text())
    assert saved["depths"] == depths and "".join(saved["pieces"]) == TEXT
    page = (tmp_path / "depth.html").read_text()
    assert page.count("<h2>routing: ") == 2
    assert (tmp_path / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no tokens"):
        depth_text_report(model, tokenizer, "", tmp_path, ["causal"])


def test_depth_png_wraps_long_text(tmp_path):
    pieces = ["word "] * 400
    short = depth_png([DepthSection("a", pieces[:5], [1] * 5)], 3, tmp_path / "short.png", "t")
    long = depth_png([DepthSection("a", pieces, [1, 2, 3, 2] * 100)], 3, tmp_path / "long.png", "t")
    from matplotlib.image import imread

    assert imread(long).shape[0] > 4 * imread(short).shape[0]  # wrapped onto many lines, not one wide line
    assert imread(long).shape[1] == imread(short).shape[1]


# ---------------------------------------------------------------------------------------------- statistics report
@pytest.mark.parametrize("router", ["expert", "token"])
def test_routing_stats_report(router, tokenizer, tmp_path):
    model = decisive(router)
    ids = tokens(3, 32)
    results = routing_stats_report(model, tokenizer, ids, tmp_path, list(model.config.routing_modes), top=5,
                                   batch_size=2, progress=False)
    names = ["topk", "causal"] if router == "expert" else ["default"]
    assert list(results["modes"]) == names
    for name in names:
        data = json.loads((tmp_path / f"depth_by_token_{name}.json").read_text())
        records = data["tokens"]
        assert sum(t["count"] for t in records) == ids.numel()  # fewer than 200 distinct tokens: all listed
        assert all(sum(t["depth_counts"]) == t["count"] for t in records)
        assert (tmp_path / f"depth_by_token_{name}.png").stat().st_size > 0
        assert "| # | depth 1 |" in (tmp_path / f"depth_by_token_{name}.md").read_text()
    saved = json.loads((tmp_path / "routing_metrics.json").read_text())
    assert saved["modes"][names[0]]["rows"] == 3
    scaling = json.loads((tmp_path / "depth_scaling.json").read_text())
    assert scaling["max_recursions"] == [1, 2, 3]
    assert all(len(curve) == 3 for curve in scaling["nll"].values())
    assert (tmp_path / "depth_scaling.png").stat().st_size > 0
    extra = "router_scores.png" if router == "expert" else "load.png"
    assert (tmp_path / extra).stat().st_size > 0
