"""LM metrics on a random transformer_lens-native model and text made here (offline)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sweep import lm_metrics
from sweep.activations import text
from sweep.activations.store import ChunkStore
from sweep.lm_metrics import LMEval, ce_loss, kl_div_score, loss_recovered, member_metrics
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


LM_NAMES = {
    "ce_loss_clean",
    "ce_loss_spliced",
    "ce_loss_ablated",
    "loss_recovered",
    "kl_div_with_sae",
    "kl_div_with_ablation",
    "kl_div_score",
    "ce_loss_score",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "ce_loss_without_sae",
}


def manual_kl(model, tokens, hook_fn, keep=None) -> float:
    """Mean over the ``keep`` positions (default all) of KL(clean || hooked), from
    whole-array logits (float64)."""
    with torch.inference_mode():
        clean = model(tokens, return_type="logits").double().log_softmax(-1)
        new = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, hook_fn)], return_type="logits")
        new = new.double().log_softmax(-1)
    kl = (clean.exp() * (clean - new)).sum(-1)  # (N, P)
    return float(kl.mean() if keep is None else kl[keep].mean())


def saebench_reference(model, tokens, sae: SAE, first: int) -> dict[str, float]:
    """SAEBench core eval's recipe, written out: per-token losses of whole-array logits,
    positions whose token is special (BOS = EOS = PAD = 0 here) left out of every mean, the
    ablation zeroing every position, the SAE spliced at positions ``first:``."""
    keep = tokens != 0  # (N, P)

    def splice(act, hook):
        out = act.clone()
        out[:, first:] = sae(act[:, first:])
        return out

    def zero(act, hook):
        return torch.zeros_like(act)

    def ce(hook_fn) -> float:
        with torch.inference_mode():
            hooks = [] if hook_fn is None else [(HOOK, hook_fn)]
            lp = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
            lp = lp.double().log_softmax(-1)
        per_token = -lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]  # (N, P - 1)
        return float(per_token[keep[:, :-1]].mean())

    clean, with_sae, ablated = ce(None), ce(splice), ce(zero)
    kl_sae, kl_ablated = (
        manual_kl(model, tokens, splice, keep),
        manual_kl(model, tokens, zero, keep),
    )
    return {
        "ce_loss_without_sae": clean,
        "ce_loss_with_sae": with_sae,
        "ce_loss_with_ablation": ablated,
        "ce_loss_score": (ablated - with_sae) / (ablated - clean),
        "kl_div_with_sae": kl_sae,
        "kl_div_with_ablation": kl_ablated,
        "kl_div_score": (kl_ablated - kl_sae) / kl_ablated,
    }


def test_loss_recovered_formula():
    assert loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert loss_recovered(2.0, 3.5, 5.0) == pytest.approx(0.5)
    assert math.isnan(loss_recovered(2.0, 3.0, 2.0))


def test_kl_div_score_formula():
    assert kl_div_score(0.0, 2.0) == 1.0
    assert kl_div_score(2.0, 2.0) == 0.0
    assert kl_div_score(0.5, 2.0) == pytest.approx(0.75)
    assert math.isnan(kl_div_score(0.1, 0.0))


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
    assert perfect.kl_div_with_sae == pytest.approx(0.0, abs=1e-6)
    assert perfect.kl_div_with_ablation > 1e-3
    assert perfect.kl_div_score == pytest.approx(1.0, abs=1e-4)
    nothing = ev.losses(zero_sae())
    assert nothing.ce_loss_spliced == pytest.approx(nothing.ce_loss_ablated, abs=1e-5)
    assert nothing.loss_recovered == pytest.approx(0.0, abs=1e-4)
    assert nothing.kl_div_with_sae == pytest.approx(nothing.kl_div_with_ablation, rel=1e-5)
    assert nothing.kl_div_score == pytest.approx(0.0, abs=1e-4)
    assert nothing.kl_div_with_ablation == perfect.kl_div_with_ablation  # cached


def test_saebench_names_follow_saebench(model, tokens):
    """Under SAEBench's names, SAEBench's recipe (special positions out of the means, every
    position zeroed); ours keep all positions and zero only what the SAE replaces."""
    eye = torch.eye(D)
    params = {"W_enc": torch.cat([eye, -eye], 1), "b_enc": torch.zeros(2 * D)}
    half = SAE({**params, "W_dec": torch.cat([eye, -eye], 0) / 2, "b_dec": torch.zeros(D)}, {})
    for first in (0, 1):
        m = LMEval(model, HOOK, tokens, first=first, batch=4).losses(half).as_dict()
        assert set(m) == LM_NAMES
        want = saebench_reference(model, tokens, half, first)
        assert {k: m[k] for k in want} == pytest.approx(want, rel=1e-4)
    assert m["ce_loss_with_ablation"] != pytest.approx(m["ce_loss_ablated"], rel=1e-3)
    assert m["ce_loss_without_sae"] != pytest.approx(m["ce_loss_clean"], rel=1e-3)
    same = LMEval(model, HOOK, tokens, batch=4, ignore=()).losses(half)
    assert (same.ce_loss_score, same.ce_loss_with_sae) == pytest.approx(
        (same.loss_recovered, same.ce_loss_spliced), rel=1e-9
    )


def test_kl_matches_whole_array_computation(model, tokens):
    """Batched (4 + 2 contexts, clean log-probs one batch at a time) = all logits at once."""

    def zero(act, hook):
        return torch.zeros_like(act)

    def halve(act, hook):
        return act / 2

    m = LMEval(model, HOOK, tokens, batch=4).losses(zero_sae())
    want = manual_kl(model, tokens, zero, keep=tokens != 0)
    assert m.kl_div_with_ablation == pytest.approx(want, rel=1e-4)
    assert m.kl_div_with_sae == pytest.approx(want, rel=1e-4)  # reconstructs 0
    halved = lm_metrics.Intervention(lambda x: x / 2)
    clean, [half] = lm_metrics.ce_and_kl(model, tokens, HOOK, [halved], batch=4, ignore={0})
    assert half.kl == pytest.approx(manual_kl(model, tokens, halve), rel=1e-4)
    assert half.kl_kept == pytest.approx(manual_kl(model, tokens, halve, tokens != 0), rel=1e-4)
    assert 0 < half.kl_kept < want and clean.kl == 0
    assert half.ce == pytest.approx(
        ce_loss(model, tokens, HOOK, lambda x: x / 2, batch=6), rel=1e-5
    )
    assert clean.ce == pytest.approx(ce_loss(model, tokens, batch=6), rel=1e-5)


def test_clean_and_ablated_run_once_and_one_batch_at_a_time(model, tokens, monkeypatch):
    calls, shapes = [], []
    measure, log_probs = lm_metrics.ce_and_kl, lm_metrics._log_probs

    def counting_measure(model, tokens_NP, hook, replaces, *args):
        calls.append(len(replaces))
        return measure(model, tokens_NP, hook, replaces, *args)

    def recording_log_probs(model, toks, *args):
        shapes.append(tuple(toks.shape))
        return log_probs(model, toks, *args)

    monkeypatch.setattr(lm_metrics, "ce_and_kl", counting_measure)
    monkeypatch.setattr(lm_metrics, "_log_probs", recording_log_probs)
    ev = LMEval(model, HOOK, tokens, batch=4)
    first, second = ev.losses(identity_sae()), ev.losses(zero_sae())
    assert calls == [2, 1]  # clean + ablation + SAE, then clean + SAE
    assert max(s[0] for s in shapes) == 4  # never more than one batch of contexts
    assert len(shapes) == 2 * 3 + 2 * 2  # 2 batches: 3 forwards each, then 2 each
    assert (first.ce_loss_clean, first.ce_loss_ablated, first.kl_div_with_ablation) == (
        second.ce_loss_clean,
        second.ce_loss_ablated,
        second.kl_div_with_ablation,
    )


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
    # SAEBench's ablation zeroes the BOS position too: not what a zero dictionary does
    assert keep_bos.ce_loss_with_ablation == pytest.approx(all_pos.ce_loss_with_ablation)
    assert abs(keep_bos.kl_div_score) > 0.01
    assert LMEval(model, HOOK, tokens, first=1).losses(
        identity_sae()
    ).kl_div_score == pytest.approx(1.0, abs=1e-4)


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
    assert set(m) == LM_NAMES
    assert m["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert member_metrics(None, params, {}) == {}
    assert (
        member_metrics(ev, {**params, "b_enc": torch.full_like(params["b_enc"], float("nan"))}, {})
        == {}
    )


def test_a_store_without_a_model_has_no_evaluator_and_no_reason(tiny_store):
    assert LMEval.prepare(tiny_store, "cpu") == (None, None)  # synthetic: no model to name


def store_with_a_model(tiny_store, tmp_path, model: str) -> ChunkStore:  # noqa: ANN001
    """A copy of the tiny store whose provenance names a language model and held-out tokens."""
    import shutil

    from sweep.activations.store import MANIFEST
    from sweep.rundir import atomic_write_json, read_json

    store_dir = tmp_path / "store"
    shutil.copytree(tiny_store.path, store_dir)
    manifest = read_json(store_dir / MANIFEST)
    manifest["provenance"] = {"source_info": {"model": model, "hook": HOOK}, "lm_eval": {}}
    atomic_write_json(store_dir / MANIFEST, manifest)
    np.save(store_dir / lm_metrics.EVAL_TOKENS_FILE, np.zeros((2, 8), dtype=np.int32))
    return ChunkStore(store_dir)


def test_a_store_whose_model_cannot_be_loaded_says_why(tiny_store, tmp_path):
    store = store_with_a_model(tiny_store, tmp_path, str(tmp_path / "gone"))
    ev, why = LMEval.prepare(store, "cpu")
    assert ev is None and "does not exist" in why


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
    perfect = LMEval(model, HOOK, held_out, first=1).losses(identity_sae())
    assert perfect.loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert perfect.kl_div_score == pytest.approx(1.0, abs=1e-4)
    np.save(store.path / EVAL_TOKENS_FILE, held_out.flip(0).numpy())  # replaced by hand
    assert LMEval.prepare(store, "cpu") == (
        None,
        f"held-out tokens {store.path / EVAL_TOKENS_FILE} hold other bits than the harvest "
        "wrote: re-run the 'sweep harvest' command that made the store to write them again",
    )


def test_many_dictionaries_share_their_passes_in_groups(model, tokens, monkeypatch):
    """members_metrics: one clean forward per batch serves a whole group of dictionaries, the
    figures equal evaluating each alone, groups are cut by bytes, diverged members skipped."""
    sae = identity_sae()
    good = {
        "W_enc": sae.W_enc.detach(),
        "b_enc": sae.b_enc.detach(),
        "W_dec": sae.W_dec.detach(),
        "b_dec": sae.b_dec.detach(),
    }
    half = {**good, "W_dec": good["W_dec"] / 2}
    nan = {**good, "b_enc": torch.full_like(good["b_enc"], float("nan"))}
    alone = [member_metrics(LMEval(model, HOOK, tokens), p, {}) for p in (good, half)]
    calls = []
    measure = lm_metrics.ce_and_kl
    monkeypatch.setattr(
        lm_metrics,
        "ce_and_kl",
        lambda m, t, h, replaces, *a: calls.append(len(replaces)) or measure(m, t, h, replaces, *a),
    )
    ev = LMEval(model, HOOK, tokens)
    got = lm_metrics.members_metrics(ev, [good, nan, half], [{}, {}, {}])
    assert calls == [3]  # ablation + the two finite dictionaries, in one pass
    assert got[1] == {}
    for a, b in zip([got[0], got[2]], alone, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    one = sum(v.numel() * 4 for v in good.values())
    monkeypatch.setattr(lm_metrics, "GROUP_BYTES", one)
    calls.clear()
    lm_metrics.members_metrics(LMEval(model, HOOK, tokens), [good, half], [{}, {}])
    assert calls == [2, 1]  # a group each


def test_contexts_per_batch_fit_the_logits_budget(model):
    """Three (b, P, V) float32 tensors per batch stay within LOGITS_BYTES: a large vocabulary
    or long contexts take fewer contexts at a time (one at least), a small model 16."""
    from types import SimpleNamespace

    assert lm_metrics.contexts_per_batch(model, 24) == 16  # vocab 97
    gemma = SimpleNamespace(cfg=SimpleNamespace(d_vocab=256_000))
    assert lm_metrics.contexts_per_batch(gemma, 128) == 5
    assert lm_metrics.contexts_per_batch(gemma, 1024) == 1
    assert LMEval(model, HOOK, torch.zeros(2, 24, dtype=torch.int64)).batch == 16


MID = "blocks.0.hook_resid_mid"


def test_a_dictionary_at_resid_mid_replaces_the_residual_stream(model, tokens, monkeypatch):
    """In the TransformerBridge, hook_resid_mid is the input of ln2: what a hook returns there
    reached only the MLP, while the stream went on unchanged (an SAE halving every activation
    measured a KL of ~0). The splice goes in through the attention's output instead."""
    seen: dict[str, torch.Tensor] = {}

    def read(name):
        def hook_fn(act, hook):
            seen[name] = act.detach().clone()
            return act

        return hook_fn

    reads = [(h, read(h)) for h in (MID, "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out")]
    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=reads)
        clean = seen.pop(MID)
        halve = lm_metrics.splice_hooks(MID, lambda x: x / 2, first=1)
        model.run_with_hooks(tokens, fwd_hooks=[*halve, *reads])
    stream = seen["blocks.0.hook_resid_post"] - seen["blocks.0.hook_mlp_out"]  # (N, P, d)
    assert torch.allclose(stream[:, 1:], clean[:, 1:] / 2, atol=1e-5)
    assert torch.allclose(stream[:, 0], clean[:, 0], atol=1e-5)  # (position 0 kept its own)
    assert lm_metrics.check_splice(model, MID, tokens, first=1) is None
    exact = LMEval(model, MID, tokens, batch=6).losses(identity_sae())
    assert exact.ce_loss_spliced == pytest.approx(exact.ce_loss_clean, rel=1e-5)
    assert exact.kl_div_with_sae == pytest.approx(0.0, abs=1e-6)
    # a model whose stream is not resid_pre + attn_out: the splice would miss it
    monkeypatch.setattr(lm_metrics, "splice_hooks", lambda hook, replace, first: [])
    why = lm_metrics.check_splice(model, MID, tokens, first=1)
    assert why and why.startswith(f"splicing a dictionary in at {MID} does not replace")
