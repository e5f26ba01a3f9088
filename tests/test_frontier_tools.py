"""The pure parts of scripts/bench_frontier.py: the FVU-vs-L0 frontier and its interpolation,
and the undoing of llama.cpp's rotary Q/K row permutation (no model, no downloads)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scripts.frontier import envelope, smollm2
from scripts.frontier.envelope import Point


def pt(l0: float, fvu: float, method: str = "m", lr: float = 1e-3) -> Point:
    return Point(method, lr, l1=0.01, l0=l0, fvu=fvu, dead_fraction=0.0)


def test_frontier_keeps_only_points_no_other_beats() -> None:
    points = [pt(10, 0.5), pt(20, 0.6), pt(40, 0.3), pt(40, 0.35), pt(80, 0.31), pt(160, 0.1)]
    front = envelope.frontier(points + [pt(5, math.nan), pt(0, 0.1)])
    assert [(p.l0, p.fvu) for p in front] == [(10, 0.5), (40, 0.3), (160, 0.1)]


def test_frontier_spans_learning_rates() -> None:
    points = [pt(20, 0.5, lr=1e-3), pt(80, 0.2, lr=1e-3), pt(40, 0.25, lr=1e-2)]
    assert [p.lr for p in envelope.frontier(points)] == [1e-3, 1e-2, 1e-3]


def test_fvu_is_linear_in_log_l0_between_frontier_points() -> None:
    front = envelope.frontier([pt(20, 0.4), pt(80, 0.2)])
    assert envelope.fvu_at(front, 40) == pytest.approx(0.3)  # halfway in log L0
    assert envelope.fvu_at(front, 20) == pytest.approx(0.4)
    assert envelope.fvu_at(front, 80) == pytest.approx(0.2)
    assert envelope.fvu_at(front, 19.9) is None and envelope.fvu_at(front, 81) is None
    assert envelope.fvu_at([], 40) is None


def test_comparison_ratio_and_na() -> None:
    fronts = {"a": [pt(20, 0.2), pt(160, 0.1)], "b": [pt(20, 0.4), pt(80, 0.2)]}
    rows = envelope.comparison(fronts, "a", "b", targets=(20, 160))
    assert rows[0]["ratio"] == pytest.approx(0.5)
    assert rows[1]["b"] is None and rows[1]["ratio"] is None
    table = envelope.markdown_table(rows, "a", "b")
    assert "| 20 | 0.2000 | 0.4000 | 0.500 |" in table and "| 160 | 0.1000 | n/a | n/a |" in table


def test_unpermute_qk_restores_half_split_rotary_rows() -> None:
    # One head of dim 4 whose rotary pairs are rows (0, 2) and (1, 3) in HF's half-split
    # layout; llama.cpp stores them interleaved: 0, 2, 1, 3.
    hf = np.arange(8, dtype=np.float32).reshape(4, 2)  # (out=4, in=2)
    gguf = smollm2.permute_qk(hf, n_head=1)
    assert gguf[:, 0].tolist() == [0, 4, 2, 6]
    assert np.array_equal(smollm2.unpermute_qk(gguf, n_head=1), hf)


def test_unpermute_qk_inverts_per_head() -> None:
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)  # 3 heads of 8
    back = smollm2.unpermute_qk(smollm2.permute_qk(w, 3), 3)
    assert np.array_equal(back, w)
    assert not np.array_equal(smollm2.unpermute_qk(w, 3), w)
    # heads stay in place: only rows inside each head move
    moved = smollm2.unpermute_qk(w, 3)
    for h in range(3):
        assert sorted(moved[h * 8 : (h + 1) * 8, 0]) == sorted(w[h * 8 : (h + 1) * 8, 0])


def test_gguf_tensor_names_map_to_llama_keys() -> None:
    assert smollm2.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert smollm2.hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
    assert smollm2.hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    norm = "model.layers.3.post_attention_layernorm.weight"
    assert smollm2.hf_name("blk.3.ffn_norm.weight") == norm


def test_a_batchtopk_dictionary_is_evaluated_in_its_inference_form() -> None:
    """Codes need pre > threshold (how SAELens saves a BatchTopK SAE, and sweep's inference)."""
    import torch

    from scripts.frontier import evaluate

    g = torch.Generator().manual_seed(0)
    d, f = 8, 32
    w = torch.randn(d, f, generator=g)
    parts = (w, torch.zeros(f), w.T.contiguous(), torch.zeros(d))
    x = torch.randn(256, d, generator=g)
    dense = evaluate.evaluate(evaluate.Dictionary(*parts), x)
    pre = x @ w
    cut = float(pre.relu().flatten().quantile(0.9))
    sparse = evaluate.evaluate(evaluate.Dictionary(*parts, torch.tensor(cut)), x)
    assert sparse["l0"] == pytest.approx(float((pre > cut).sum()) / 256)
    assert sparse["l0"] < dense["l0"]
    topk = evaluate.evaluate(evaluate.Dictionary(*parts, None, 3), x)
    assert topk["l0"] == pytest.approx(3.0)  # every row has more than 3 positive codes here


@pytest.mark.parametrize("recipe", ["linear", "log"])
def test_a_sweep_jumprelu_run_is_evaluated_with_its_threshold(recipe, monkeypatch) -> None:
    """Either recipe's threshold (``threshold`` or ``log_threshold``) reaches the evaluation."""
    import torch

    import sweep
    from scripts.frontier import evaluate
    from sweep import archs
    from sweep.sae import SAE

    arch = archs.get("jumprelu").configure(recipe)
    params = arch.init_params(8, 32, torch.Generator().manual_seed(0))
    trained = SAE(params, {"architecture": "jumprelu", "recipe": recipe, "act_scale": 1.0})
    monkeypatch.setattr(sweep, "load_run", lambda folder: trained)
    d = evaluate.from_sweep_run("run", 1.0)
    assert d.threshold is not None
    torch.testing.assert_close(d.threshold, torch.full((32,), arch.form.init))
