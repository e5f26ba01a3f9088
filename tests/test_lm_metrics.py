"""LM metrics on a random transformer_lens-native model and text made here (offline)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from sweep import lm_metrics
from sweep.activations import text
from sweep.activations.store import ChunkStore
from sweep.lm_metrics import LMEval, ce_loss, loss_recovered, member_metrics
from sweep.sae import SAE
from tests.tiny_lm import native_model, write_text

HOOK = "blocks.0.hook_resid_post"
D = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return native_model(tmp_path_factory.mktemp("tok"), n_layers=2, d_model=D)


@pytest.fixture(scope="module")
def tokens(model, tmp_path_factory) -> torch.Tensor:
    path = write_text(tmp_path_factory.mktemp("lm") / "eval.txt", n_docs=40, seed=1)
    arr = text.token_contexts(
        text.iter_documents(str(path)), model.tokenizer, 6, 24, prepend_bos=True
    )
    return torch.from_numpy(arr.astype(np.int64))  # (6, 24)


def identity_sae(d: int = D) -> SAE:
    """relu(x) - relu(-x) = x: a dictionary that reconstructs every activation exactly."""
    eye = torch.eye(d)
    params = {
        "W_enc": torch.cat([eye, -eye], 1),
        "b_enc": torch.zeros(2 * d),
        "W_dec": torch.cat([eye, -eye], 0),
        "b_dec": torch.zeros(d),
    }
    return SAE(params, {"act_scale": 2.0})  # scale folded in: still exact on raw activations


def zero_sae(d: int = D) -> SAE:
    params = {
        "W_enc": torch.zeros(d, 4),
        "b_enc": torch.zeros(4),
        "W_dec": torch.eye(4, d),
        "b_dec": torch.zeros(d),
    }
    return SAE(params, {})


def test_loss_recovered_formula():
    assert loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert loss_recovered(2.0, 3.5, 5.0) == pytest.approx(0.5)
    assert math.isnan(loss_recovered(2.0, 3.0, 2.0))


def test_clean_loss_is_the_models_loss(model, tokens):
    with torch.inference_mode():
        ref = float(model(tokens, return_type="loss"))
    assert ce_loss(model, tokens, batch=4) == pytest.approx(
        ref, rel=1e-5
    )  # batches weighted by size


def test_perfect_sae_recovers_everything_and_zero_sae_nothing(model, tokens):
    ev = LMEval(model, HOOK, tokens, first=0, batch=4)
    perfect = ev.losses(identity_sae())
    assert perfect.ce_loss_spliced == pytest.approx(perfect.ce_loss_clean, abs=1e-4)
    assert perfect.loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert perfect.ce_loss_ablated != pytest.approx(perfect.ce_loss_clean, abs=1e-3)
    nothing = ev.losses(zero_sae())
    assert nothing.ce_loss_spliced == pytest.approx(nothing.ce_loss_ablated, abs=1e-5)
    assert nothing.loss_recovered == pytest.approx(0.0, abs=1e-4)


def test_ablation_matches_a_manual_zero_hook(model, tokens):
    def zero(act, hook):
        return torch.zeros_like(act)

    with torch.inference_mode():
        ref = float(model.run_with_hooks(tokens, fwd_hooks=[(HOOK, zero)], return_type="loss"))
    assert LMEval(model, HOOK, tokens, batch=6).losses(
        identity_sae()
    ).ce_loss_ablated == pytest.approx(ref, rel=1e-5)


def test_dropped_bos_position_is_left_alone(model, tokens):
    hook_fn = lm_metrics._hook_fn(torch.zeros_like, first=1)
    x = torch.randn(2, 5, D)
    out = hook_fn(x)
    assert torch.equal(out[:, 0], x[:, 0]) and not out[:, 1:].any()
    keep_bos = LMEval(model, HOOK, tokens, first=1).losses(zero_sae())
    all_pos = LMEval(model, HOOK, tokens, first=0).losses(zero_sae())
    assert keep_bos.ce_loss_ablated != pytest.approx(all_pos.ce_loss_ablated, abs=1e-4)
    assert keep_bos.loss_recovered == pytest.approx(0.0, abs=1e-4)


def test_member_metrics_skips_diverged_and_missing(model, tokens):
    sae = identity_sae()
    params = {
        "W_enc": sae.W_enc.detach() / 2,
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach() * 2,
        "b_dec": sae.b_dec.detach() * 2,
    }
    ev = LMEval(model, HOOK, tokens)
    m = member_metrics(ev, params, {"act_scale": 2.0})
    assert set(m) == {"ce_loss_clean", "ce_loss_spliced", "ce_loss_ablated", "loss_recovered"}
    assert m["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert member_metrics(None, params, {}) == {}
    assert (
        member_metrics(ev, {**params, "b_enc": torch.full_like(params["b_enc"], float("nan"))}, {})
        == {}
    )


def test_for_store_without_a_model_is_none(tiny_store):
    assert LMEval.for_store(tiny_store, "cpu") is None  # synthetic store: no model in provenance


def test_for_store_with_unloadable_model_warns(tiny_store, tmp_path, caplog):
    import shutil

    from sweep.activations.store import MANIFEST
    from sweep.rundir import atomic_write_json, read_json

    store_dir = tmp_path / "store"
    shutil.copytree(tiny_store.path, store_dir)
    manifest = read_json(store_dir / MANIFEST)
    manifest["provenance"] = {
        "source_info": {"model": str(tmp_path / "gone"), "hook": HOOK},
        "lm_eval": {},
    }
    atomic_write_json(store_dir / MANIFEST, manifest)
    np.save(store_dir / lm_metrics.EVAL_TOKENS_FILE, np.zeros((2, 8), dtype=np.int32))
    with caplog.at_level(logging.WARNING, logger="sweep.lm_metrics"):
        assert LMEval.for_store(ChunkStore(store_dir), "cpu") is None
    assert "LM metrics skipped" in caplog.text and "does not exist" in caplog.text


def test_harvest_from_a_native_model_then_evaluate(model, tmp_path):
    from sweep.activations.harvest import EVAL_TOKENS_FILE, run_harvest
    from sweep.config import HarvestConfig

    data = write_text(tmp_path / "t.txt", n_docs=60, seed=2)
    cfg = HarvestConfig(
        model="native-test",
        dataset=str(data),
        hooks=[HOOK],
        rows=600,
        context=24,
        rows_per_chunk=256,
        lm_eval_tokens=96,
        store_dir=str(tmp_path / "s"),
        device="cpu",
        progress=False,
    )
    store = run_harvest(cfg, model=model)[HOOK]
    assert (
        store.total_rows == 600 and store.width == D and store.provenance["model"] == "native-test"
    )
    held_out = torch.from_numpy(np.load(store.path / EVAL_TOKENS_FILE).astype(np.int64))  # (4, 24)
    assert held_out.shape == (4, 24) and (held_out[:, 0] == model.tokenizer.bos_token_id).all()
    assert LMEval(model, HOOK, held_out, first=1).losses(
        identity_sae()
    ).loss_recovered == pytest.approx(1.0, abs=1e-3)
