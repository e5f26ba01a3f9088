"""Harvest: rows equal the model's activations, shuffled across contexts; resume; bad input."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sweep.activations import harvest, harvest_dir, lm, text
from sweep.activations.harvest import HarvestPlan, run_harvest
from sweep.activations.store import ChunkStore, chunk_name
from sweep.cli import main
from sweep.config import HarvestConfig, HarvestDataConfig, HarvestSource
from sweep.errors import StoreError, SweepError
from tests.conftest import refused
from tests.tiny_lm import char_tokenizer, save_tiny_gpt2, write_text

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("models") / "gpt2-tiny")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "docs.txt")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    return lm.load_model(str(tiny_model_dir), "cpu")


def tiny_cfg(model_dir: Path, data: Path, store_dir: Path, **kw) -> HarvestConfig:
    base = dict(
        model=str(model_dir),
        dataset=str(data),
        hooks=list(HOOKS),
        rows=3000,
        context=32,
        rows_per_chunk=512,
        shuffle_rows=1024,
        batch_contexts=8,
        lm_eval_tokens=256,
        store_dir=str(store_dir),
        device="cpu",
        progress=False,
    )
    base.update(kw)
    return HarvestConfig(**base)


def cli_args(cfg: HarvestConfig) -> list[str]:
    keys = (
        "model",
        "dataset",
        "rows",
        "context",
        "rows_per_chunk",
        "shuffle_rows",
        "batch_contexts",
        "lm_eval_tokens",
        "store_dir",
        "device",
        "progress",
    )
    return ["harvest", f"hooks=[{','.join(cfg.hooks)}]", *(f"{k}={getattr(cfg, k)}" for k in keys)]


def store_rows(store: ChunkStore) -> list[torch.Tensor]:
    return [store.read_rows(i).float() for i in range(len(store.chunks))]


def reference_rows(model, cfg: HarvestConfig, hook: str) -> torch.Tensor:
    """Every harvested row in stream order, straight from the model: (rows, d)."""
    plan = HarvestPlan.of(cfg)
    tokens = np.load(Path(cfg.store_dir) / harvest.TOKENS_FILE)[: plan.n_contexts]
    acts = lm.capture(model, torch.from_numpy(tokens.astype(np.int64)), [hook])[hook]  # (N, P, d)
    return acts[:, plan.first :].reshape(-1, acts.shape[-1])[: cfg.rows].half().float()  # (rows, d)


def test_plan_layout():
    cfg = HarvestConfig(
        model="m",
        dataset="d",
        hooks=["h"],
        store_dir="s",
        rows=1000,
        context=11,
        rows_per_chunk=100,
        shuffle_rows=250,
        lm_eval_tokens=30,
    )
    p = HarvestPlan.of(cfg)
    assert (p.rows_per_context, p.body, p.n_contexts, p.n_chunks) == (10, 10, 100, 10)
    assert (p.chunks_per_group, p.n_groups, p.eval_contexts) == (3, 4, 3)
    assert list(p.group_chunks(3)) == [9] and p.group_rows(3) == (900, 1000)
    assert [list(p.shard_groups(s, 2)) for s in range(2)] == [[0, 1], [2, 3]]
    keep = HarvestPlan.of(replace(cfg, drop_bos=False))
    assert (keep.first, keep.rows_per_context, keep.body) == (0, 11, 10)


def test_token_contexts_prepend_bos_and_separate_documents():
    tok = char_tokenizer()
    out = text.token_contexts(["ab", "cde"], tok, n_contexts=2, context=4, prepend_bos=True)
    ids = (
        tok("ab", add_special_tokens=False)["input_ids"]
        + [0]
        + tok("cde", add_special_tokens=False)["input_ids"]
    )
    assert out.tolist() == [[0, *ids[:3]], [0, *ids[3:6]]]
    with pytest.raises(text.NotEnoughText) as err:
        text.token_contexts(["ab"], tok, n_contexts=5, context=4, prepend_bos=True)
    assert err.value.available_tokens == 3


def test_harvest_rows_are_the_models_activations_shuffled(
    tiny_model, tiny_model_dir, text_file, tmp_path
):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h")
    stores = run_harvest(cfg)
    plan = HarvestPlan.of(cfg)
    matched = {}
    tokens = np.load(tmp_path / "h" / harvest.TOKENS_FILE)
    rpc = plan.rows_per_context
    keys = [
        tuple(tokens[r // rpc, : r % rpc + 2]) for r in range(cfg.rows)
    ]  # row r: context, prefix
    for hook, store in stores.items():
        assert (
            store.path == tmp_path / "h" / hook
            and store.total_rows == cfg.rows
            and store.dtype == "float16"
        )
        ref = reference_rows(tiny_model, cfg, hook)  # (rows, d) in stream order
        got = torch.cat(store_rows(store))
        dist, src = torch.cdist(got, ref).min(dim=1)  # nearest reference row of every stored row
        assert dist.max() < 1e-2 * ref.norm(dim=1).mean()
        # Each token position exactly once (positions with the same token prefix have the same
        # activations, so positions are compared by their prefix).
        matched[hook] = [keys[i] for i in src.tolist()]
        assert Counter(matched[hook]) == Counter(keys)
        for i in range(len(store.chunks)):  # a chunk mixes rows of many contexts, not a few
            rows = src[i * cfg.rows_per_chunk : (i + 1) * cfg.rows_per_chunk]
            assert (
                len(set((rows // plan.rows_per_context).tolist()))
                > 0.6 * plan.n_contexts / plan.n_groups
            )
        prov = store.provenance
        assert prov["model"] == str(tiny_model_dir.resolve()) and prov["hook"] == hook
        assert prov["token_range"] == [0, plan.n_contexts * plan.body] and prov["context"] == 32
        assert prov["source_info"]["hook"] == hook and prov["dtype"] == "float16"
        assert np.load(store.path / harvest.EVAL_TOKENS_FILE).shape == (plan.eval_contexts, 32)
    assert matched[HOOKS[0]] == matched[HOOKS[1]]  # the same token at each row of every store


def test_eval_tokens_follow_the_harvested_range(tiny_model_dir, text_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    store = run_harvest(cfg)[HOOKS[0]]
    assert store.path == tmp_path / "h"  # one hook: store_dir is the store
    plan = HarvestPlan.of(cfg)
    stream = text.token_contexts(
        text.iter_documents(str(text_file)), char_tokenizer(), plan.n_contexts + 8, 32, True
    )
    assert np.array_equal(np.load(store.path / harvest.EVAL_TOKENS_FILE), stream[plan.n_contexts :])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("chunk_*.npy"))}


def harvest_dying_at_second_group(cfg: HarvestConfig, monkeypatch) -> None:
    """Run ``cfg``'s harvest until it dies while writing group 1 (as a killed process would)."""
    real_write, calls = harvest._write_group, []

    def crash_on_second_group(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(*args)

    monkeypatch.setattr(harvest, "_write_group", crash_on_second_group)
    with pytest.raises(KeyboardInterrupt):
        run_harvest(cfg)
    monkeypatch.setattr(harvest, "_write_group", real_write)


@pytest.fixture
def clean_and_cut(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """A harvest into ``tmp_path/clean``, and the same into ``tmp_path/cut`` dying at its
    second group: their configs."""
    clean = tiny_cfg(tiny_model_dir, text_file, tmp_path / "clean")
    run_harvest(clean)
    cut = replace(clean, store_dir=str(tmp_path / "cut"))
    harvest_dying_at_second_group(cut, monkeypatch)
    return clean, cut


def test_interrupted_harvest_resumes_to_the_same_store(clean_and_cut, tmp_path):
    _, cfg = clean_and_cut
    store = tmp_path / "cut" / HOOKS[0]
    assert not (store / "manifest.json").exists()  # an unfinished harvest is not a store
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ChunkStore(store)
    # A half-written chunk: data on disk but no stats sidecar. It must not count as written.
    (store / chunk_name(1)).with_suffix(".json").unlink()
    (store / chunk_name(1)).write_bytes(b"\x93NUMPY truncated")
    kept = (store / chunk_name(0)).stat().st_mtime_ns
    run_harvest(cfg)
    assert (store / chunk_name(0)).stat().st_mtime_ns == kept  # finished chunks are not redone
    assert _snapshot(tmp_path / "cut") == _snapshot(tmp_path / "clean")
    assert (
        ChunkStore(store).manifest["stats"]
        == ChunkStore(tmp_path / "clean" / HOOKS[0]).manifest["stats"]
    )


def test_a_harvest_resumed_under_a_torch_that_shuffles_otherwise_rewrites_the_partial_group(
    tiny_model_dir, text_file, tmp_path, monkeypatch, caplog
):
    """Begun under a torch whose randperm differs (an upgrade between two runs of a long
    harvest), a group found partly written is harvested again whole: its missing chunks
    alone, shuffled otherwise, would repeat some of its rows and lose others. The store ends
    as an uninterrupted harvest under this torch."""
    clean = tiny_cfg(tiny_model_dir, text_file, tmp_path / "clean")
    run_harvest(clean)
    cut = replace(clean, store_dir=str(tmp_path / "cut"))
    real = harvest._group_perm
    monkeypatch.setattr(harvest, "_group_perm", lambda *a: real(*a).flip(0))  # "old torch"
    harvest_dying_at_second_group(cut, monkeypatch)
    monkeypatch.setattr(harvest, "_group_perm", real)
    store = tmp_path / "cut" / HOOKS[0]
    harvest_dir.remove_chunks(store, [1])  # group 0 (chunks 0, 1): killed between its two chunks
    with caplog.at_level(logging.WARNING, logger="sweep.activations.harvest"):
        run_harvest(cut)
    assert "shuffles a harvest group's rows otherwise" in caplog.text
    assert _snapshot(tmp_path / "cut") == _snapshot(tmp_path / "clean")
    assert harvest_dir.stream_record(tmp_path / "cut")["randperm"] != (
        harvest.shuffle_fingerprint(harvest.HarvestPlan.of(cut))
    )  # (the record stays the beginning torch's)


def test_a_damaged_token_stream_is_found_and_one_of_a_changed_dataset_refused(
    tiny_model_dir, text_file, tmp_path, monkeypatch, caplog
):
    """The token stream's sha256 is recorded: one damaged in place (its shape intact) is
    made again, not harvested from; made again from a dataset changed since, it is refused
    (mixed with the chunks already written, the store would hold two token streams)."""
    data = tmp_path / "text.txt"
    shutil.copy(text_file, data)
    clean = tiny_cfg(tiny_model_dir, data, tmp_path / "clean")
    run_harvest(clean)
    cut = replace(clean, store_dir=str(tmp_path / "cut"))
    harvest_dying_at_second_group(cut, monkeypatch)
    tokens = tmp_path / "cut" / harvest.TOKENS_FILE
    kept = tokens.read_bytes()
    bad = bytearray(kept)
    bad[-1] ^= 1  # (shape intact)
    tokens.write_bytes(bytes(bad))
    with caplog.at_level(logging.WARNING, logger="sweep.activations.harvest_dir"):
        run_harvest(cut)
    assert "is damaged; making it again" in caplog.text
    assert _snapshot(tmp_path / "cut") == _snapshot(tmp_path / "clean")
    assert tokens.read_bytes() == kept
    again = replace(clean, store_dir=str(tmp_path / "again"))
    harvest_dying_at_second_group(again, monkeypatch)
    (tmp_path / "again" / harvest.TOKENS_FILE).write_bytes(bytes(bad))
    data.write_text("other words entirely.\n\n" + data.read_text())
    with pytest.raises(StoreError, match="token stream made again from .* differs from the one"):
        run_harvest(again)


def refuse_reading(monkeypatch, victim: Path) -> None:
    """Reading ``victim`` fails as a permission refused does (the rest reads as it is)."""
    monkeypatch.setattr(Path, "read_text", refused(Path.read_text, victim))
    monkeypatch.setattr(np, "load", refused(np.load, victim))


@pytest.mark.parametrize("name", [harvest_dir.STREAM_FILE, harvest.TOKENS_FILE])
def test_an_unfinished_harvests_token_stream_that_could_not_be_read_is_kept(
    clean_and_cut, tmp_path, monkeypatch, caplog, name
):
    """Its record (the stream's checksum) or the stream itself, unreadable, proves nothing:
    the stream was called damaged and made again, the record written again without its
    checksum (a damaged stream, or one of a changed dataset, then went unseen)."""
    _, cut = clean_and_cut
    victim = tmp_path / "cut" / name
    before = victim.read_bytes()
    refuse_reading(monkeypatch, victim)
    with caplog.at_level(logging.WARNING), pytest.raises(PermissionError):
        run_harvest(cut)
    assert victim.read_bytes() == before and "damaged" not in caplog.text


def test_a_complete_harvest_whose_manifest_could_not_be_read_is_not_harvested_again(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    run_harvest(cfg)
    manifest = tmp_path / "h" / "manifest.json"
    before = manifest.read_bytes()
    refuse_reading(monkeypatch, manifest)

    def no_model(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("model loaded: the complete harvest taken for an unfinished one")

    monkeypatch.setattr(lm, "load_model", no_model)
    with pytest.raises((PermissionError, StoreError)):
        run_harvest(cfg)
    assert manifest.read_bytes() == before  # (a harvest redone: a store of another identity)


def test_complete_harvest_is_reused_without_the_model(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    run_harvest(cfg)

    def no_model(*a, **k):
        raise AssertionError("model loaded for a complete harvest")

    monkeypatch.setattr(lm, "load_model", no_model)
    assert run_harvest(cfg)[HOOKS[0]].total_rows == 620


def test_changed_settings_refused_and_nothing_touched(tiny_model_dir, text_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    run_harvest(cfg)
    before = _snapshot(tmp_path / "h")
    with pytest.raises(
        StoreError, match=r"different settings \(context 32 -> 16; rows 620 -> 700\)"
    ):
        run_harvest(replace(cfg, rows=700, context=16))
    assert _snapshot(tmp_path / "h") == before


def _hook_store(root: Path, hook: str) -> Path:
    return root / hook.replace("/", "_")


def test_a_harvest_of_several_hooks_names_its_stores_where_one_was_wanted(
    tiny_model_dir, text_file, tmp_path
):
    """Its folder is no store, one hook's store is no harvest, a harvest of one of its hooks
    into it is refused: each time the one line says which store to train on, and how."""
    root = tmp_path / "h"
    cfg = tiny_cfg(tiny_model_dir, text_file, root, rows=620)
    run_harvest(cfg)
    before = _snapshot(root)
    stores = f"point data.path at one of them ({_hook_store(root, HOOKS[0])}, "
    with pytest.raises(
        StoreError, match=re.escape(f"harvest of 2 hooks, one store each; {stores}")
    ):
        ChunkStore(root)
    one = _hook_store(root, HOOKS[1])
    with pytest.raises(StoreError, match=re.escape(f"data=chunks data.path={one}, or choose an")):
        run_harvest(replace(cfg, hooks=[HOOKS[1]], store_dir=str(one)))
    with pytest.raises(StoreError, match=rf"its store of {HOOKS[1]} trains as data=chunks "):
        run_harvest(replace(cfg, hooks=[HOOKS[1]]))
    assert _snapshot(root) == before
    assert ChunkStore(one).total_rows == 620  # (and data=chunks trains on it: below)


def test_cli_harvest_then_train_on_chunks(tiny_model_dir, text_file, tmp_path, capsys):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1])
    assert main(cli_args(cfg)) == 0
    out = capsys.readouterr().out
    assert f"{HOOKS[0]}: {tmp_path / 'h'} (3000 rows x 32, float16)" in out
    from sweep import worker
    from tests.sweep_builder import jobs

    job = jobs(
        ChunkStore(tmp_path / "h"),
        tmp_path / "sw",
        l1s=(1e-2,),
        ratios=(2.0,),
        seeds=1,
        batch_size=128,
    )[0]
    data = HarvestDataConfig(model="m", dataset="d", rows=3000, hook=HOOKS[0], lm_eval_tokens=128)
    job = replace(job, eval_rows=256, data=data)
    assert worker.train_ensemble(job).states
    run = tmp_path / "sw" / "runs" / job.ensemble.members[0].run_id
    m = json.loads((run / "metrics.json").read_text())
    assert {"ce_loss_clean", "ce_loss_spliced", "ce_loss_ablated", "loss_recovered"} <= set(m)
    assert m["loss_recovered"] == pytest.approx(
        (m["ce_loss_ablated"] - m["ce_loss_spliced"]) / (m["ce_loss_ablated"] - m["ce_loss_clean"])
    )
    assert json.loads((run / "cfg.json").read_text())["provenance"]["hook"] == HOOKS[0]


def _one_line_error(capsys) -> str:
    lines = [
        ln for ln in capsys.readouterr().err.strip().splitlines() if "Loading weights" not in ln
    ]
    assert len(lines) == 1 and lines[0].startswith("error: "), (
        lines
    )  # (transformers' load bar aside)
    return lines[0]


def test_unknown_hook_lists_near_valid_names(tiny_model_dir, text_file, tmp_path, capsys):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=["blocks.1.hook_resid_pst"])
    assert main(cli_args(cfg)) == 2
    err = _one_line_error(capsys)
    assert "unknown hook 'blocks.1.hook_resid_pst'" in err and "blocks.1.hook_resid_post" in err
    assert not (tmp_path / "h").exists()  # the store_dir it made is gone again


def test_model_folder_without_weights(tiny_model_dir, text_file, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    assert main(cli_args(tiny_cfg(bare, text_file, tmp_path / "h"))) == 2
    assert "has no weights" in _one_line_error(capsys)


def test_empty_dataset(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n\n")
    assert main(cli_args(tiny_cfg(tiny_model_dir, empty, tmp_path / "h"))) == 2
    assert "is empty" in _one_line_error(capsys)
    assert not (tmp_path / "h" / harvest.PARAMS_FILE).exists()


def test_rows_beyond_the_dataset_says_how_many_fit(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(cli_args(tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", rows=10**6))) == 2
    err = _one_line_error(capsys)
    n_tokens = len(
        np.concatenate(
            [
                np.asarray(x)
                for x in char_tokenizer()(
                    list(text.iter_documents(str(text_file))), add_special_tokens=False
                )["input_ids"]
            ]
        )
    )
    n_docs = len(list(text.iter_documents(str(text_file))))
    fit = ((n_tokens + n_docs) // 31 - 8) * 31
    assert f"at most {fit} rows" in err and f"lower rows to {fit}" in err
    assert not (tmp_path / "h").exists()
    nested = tiny_cfg(tiny_model_dir, text_file, tmp_path / "deep" / "a" / "h", rows=10**6)
    assert main(cli_args(nested)) == 2 and not (tmp_path / "deep").exists()
    (tmp_path / "h").mkdir()  # one the user made stays
    assert main(cli_args(tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", rows=10**6))) == 2
    assert (tmp_path / "h").is_dir()


def test_unwritable_store_dir_and_non_store_folder(tiny_model_dir, text_file, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert main(cli_args(tiny_cfg(tiny_model_dir, text_file, tmp_path / "afile" / "h"))) == 2
    assert "not writable" in _one_line_error(capsys)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(cli_args(tiny_cfg(tiny_model_dir, text_file, other))) == 2
    assert "not a harvest" in _one_line_error(capsys)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_missing_dataset_file(tiny_model_dir, tmp_path):
    with pytest.raises(SweepError, match="does not exist"):
        run_harvest(tiny_cfg(tiny_model_dir, tmp_path / "nope.txt", tmp_path / "h"))


def test_jsonl_dataset_field(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"body": "some words " * 20}) for _ in range(10)))
    store = run_harvest(
        tiny_cfg(
            tiny_model_dir,
            data,
            tmp_path / "h",
            hooks=HOOKS[:1],
            rows=400,
            text_field="body",
            lm_eval_tokens=0,
        )
    )[HOOKS[0]]
    assert store.total_rows == 400
    with pytest.raises(SweepError, match="no field 'text'"):
        run_harvest(tiny_cfg(tiny_model_dir, data, tmp_path / "h2", hooks=HOOKS[:1], rows=400))


def test_a_json_file_holding_an_array_of_records_is_read_as_its_records(tmp_path):
    """A ``.json`` file may be JSON Lines or one array (pretty-printed or not); a record
    without the field is named by its index."""
    rows = [{"text": "hello world"}, {"text": None}, {"text": "again"}]
    data = tmp_path / "d.json"
    for written in (json.dumps(rows), "\n  " + json.dumps(rows, indent=2)):
        data.write_text(written)
        assert list(text.iter_documents(str(data))) == ["hello world", "again"]
    data.write_text(json.dumps([*rows, {"body": "x"}]))
    with pytest.raises(SweepError, match=r"record 3 of .*d.json has no field 'text'; set text_"):
        list(text.iter_documents(str(data)))
    for bom in (data, tmp_path / "d.jsonl"):  # (a BOM, as some Windows editors write)
        text_ = json.dumps(rows) if bom.suffix == ".json" else "\n".join(map(json.dumps, rows))
        bom.write_bytes(b"\xef\xbb\xbf" + text_.encode())
        assert list(text.iter_documents(str(bom))) == ["hello world", "again"]
    data.write_text(json.dumps(rows)[:-1])
    with pytest.raises(SweepError, match=r"d.json is not valid JSON \(.* at line 1\); fix the"):
        list(text.iter_documents(str(data)))


def test_null_text_is_no_document_and_other_values_are_refused(tmp_path):
    """A null text (a JSONL null, a parquet or dataset null) is no document, in every format;
    a list or number is refused, naming where (it was harvested as its printed form, e.g.
    the document "None")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "hello world"}, {"text": None}, {"text": "again"}]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "d.parquet")
    for f in (data, tmp_path / "d.parquet"):
        assert list(text.iter_documents(str(f))) == ["hello world", "again"]
    for bad, kind in ([["a", "b"], "list"], [12, "int"]):
        data.write_text("\n".join(json.dumps(r) for r in [*rows, {"text": bad}]))
        with pytest.raises(SweepError, match=rf"line 4 of .*d.jsonl: 'text' holds a {kind} "):
            list(text.iter_documents(str(data)))


def test_shards_on_ray_match_one_process(ray_cluster, tiny_model_dir, text_file, tmp_path):
    one = run_harvest(tiny_cfg(tiny_model_dir, text_file, tmp_path / "one"))
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "two", shards=2)
    two = run_harvest(cfg)
    for hook in HOOKS:
        assert len(two[hook].provenance["shards"]) == 2
        ranges = [s["rows"] for s in two[hook].provenance["shards"]]
        assert (
            ranges[0][0] == 0 and ranges[0][1] == ranges[1][0] and ranges[1][1] == cfg.rows
        )  # disjoint, complete
        for a, b in zip(store_rows(one[hook]), store_rows(two[hook]), strict=True):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_run_data_harvest_trains_with_lm_metrics(
    ray_cluster, tiny_model_dir, text_file, tmp_path, capsys
):
    sw = tmp_path / "sw"
    args = [
        "run",
        "data=harvest",
        f"data.model={tiny_model_dir}",
        f"data.hook={HOOKS[0]}",
        f"data.dataset={text_file}",
        "data.rows=3000",
        "data.context=32",
        "data.rows_per_chunk=1024",
        "data.eval_rows=512",
        "data.lm_eval_tokens=128",
        "data.device=cpu",
        "grid.l1=[1e-2]",
        "grid.dict_ratio=[2]",
        "train.batch_size=128",
        "train.device=cpu",
        f"sweep_dir={sw}",
        "progress=false",
    ]
    assert main(args) == 0
    assert (sw / "store" / "manifest.json").is_file()
    run = next((sw / "runs").iterdir())
    assert "loss_recovered" in json.loads((run / "metrics.json").read_text())
    mtime = (sw / "store" / "manifest.json").stat().st_mtime_ns
    assert main(args) == 0  # second time: store complete, harvest skipped
    assert (sw / "store" / "manifest.json").stat().st_mtime_ns == mtime


def test_a_sweep_given_a_relative_model_and_dataset_resumes_from_anywhere(
    ray_cluster, tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """config.yaml records the local model folder and dataset as absolute paths (as the
    harvest does): a resume from another working directory finds the same harvest; the same
    command run again where it began is the same sweep."""
    here, elsewhere, sw = tmp_path / "here", tmp_path / "elsewhere", tmp_path / "sw"
    elsewhere.mkdir()
    shutil.copytree(tiny_model_dir, here / "tm")
    shutil.copy(text_file, here / "docs.txt")
    monkeypatch.chdir(here)
    args = ["run", "data=harvest", "data.model=tm", "data.dataset=docs.txt",
            f"data.hook={HOOKS[0]}", "data.rows=1500", "data.context=32",
            "data.rows_per_chunk=512", "data.eval_rows=256", "data.lm_eval_tokens=64",
            "data.device=cpu", "grid.l1=[1e-2]", "grid.dict_ratio=[1]", "train.batch_size=128",
            "train.device=cpu", f"sweep_dir={sw}", "progress=false"]  # fmt: skip
    assert main(args) == 0
    saved = yaml.safe_load((sw / "config.yaml").read_text())["data"]
    assert (saved["model"], saved["dataset"]) == (str(here / "tm"), str(here / "docs.txt"))
    assert main(args) == 0
    monkeypatch.chdir(elsewhere)
    assert main(["resume", str(sw)]) == 0


def test_on_exclusive_gpus_the_driver_harvests_in_a_ray_task(
    ray_cluster, tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """On GPUs that take one process each, a data=harvest sweep's one shard harvests in a Ray
    task, whose process (and CUDA context) ends with it, not in the driver; a harvest on the
    CPU makes no CUDA context and stays in the driver (all its threads, its progress bar)."""
    from sweep import driver
    from sweep.activations import harvest
    from sweep.cli import compose
    from sweep.config import to_sweep_config
    from tests.test_gpuinfo import exclusive_gpus_here

    exclusive_gpus_here(tmp_path, monkeypatch)
    here, real = [], harvest.harvest_shard
    monkeypatch.setattr(harvest, "harvest_shard", lambda *a: here.append(1) or real(*a))
    for device, in_driver in (("auto", False), ("cpu", True)):
        over = [
            "data=harvest", f"data.model={tiny_model_dir}", f"data.hook={HOOKS[0]}",
            f"data.dataset={text_file}", "data.rows=3000", "data.context=32",
            "data.rows_per_chunk=1024", "data.eval_rows=512", "data.lm_eval_tokens=128",
            f"data.device={device}", f"sweep_dir={tmp_path / device}", "progress=false",
        ]  # fmt: skip
        here.clear()
        store = driver.prepare_store(to_sweep_config(compose(over)))
        assert store.total_rows == 3000 and bool(here) == in_driver, device


# ---- what a refused or failed harvest leaves, and what a re-run makes of it


def sweep_args(model_dir: Path, data: Path, sweep_dir: Path) -> list[str]:
    return [
        "run", "data=harvest", f"data.model={model_dir}", f"data.hook={HOOKS[0]}",
        f"data.dataset={data}", "data.rows=3000", "data.context=32", "data.rows_per_chunk=1024",
        "data.shuffle_rows=1024", "data.eval_rows=512", "data.lm_eval_tokens=128",
        "data.device=cpu", "grid.l1=[1e-2]", "grid.dict_ratio=[2]", "train.batch_size=128",
        "train.device=cpu", f"sweep_dir={sweep_dir}", "progress=false",
    ]  # fmt: skip


def test_a_new_sweep_that_fails_while_harvesting_keeps_what_it_harvested(
    ray_cluster, tiny_model_dir, text_file, tmp_path, monkeypatch, capsys
):
    """The refused run's new sweep folder goes, but not the chunks it harvested (hours on a
    real model): the re-run resumes them."""
    real_write, calls = harvest._write_group, []

    def full_disk_on_second_group(*args):
        calls.append(1)
        if len(calls) == 2:
            raise StoreError("cannot write chunk 1: No space left on device; free space")
        return real_write(*args)

    monkeypatch.setattr(harvest, "_write_group", full_disk_on_second_group)
    sw = tmp_path / "sw"
    assert main(sweep_args(tiny_model_dir, text_file, sw)) == 2
    assert "No space left" in _one_line_error(capsys)
    first = sw / "store" / chunk_name(0)
    kept = first.stat().st_mtime_ns
    assert (sw / "store" / harvest.PARAMS_FILE).is_file() and not (sw / "runs").exists()
    monkeypatch.setattr(harvest, "_write_group", real_write)
    assert main(sweep_args(tiny_model_dir, text_file, sw)) == 0
    assert first.stat().st_mtime_ns == kept  # resumed, not harvested again


def test_a_complete_harvest_needs_no_write_access(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """A lab's shared, read-only store is reused as it is."""
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    run_harvest(cfg)

    def read_only(folder, what):
        raise SweepError(f"{what} {folder} is not writable (Read-only file system)")

    monkeypatch.setattr(harvest_dir, "ensure_writable", read_only)
    assert run_harvest(cfg)[HOOKS[0]].total_rows == 620


@pytest.mark.parametrize("shards", [1, 2])
def test_a_hook_without_per_token_rows_is_refused_before_anything_is_written(
    ray_cluster, tiny_model_dir, text_file, tmp_path, capsys, shards
):
    """The attention pattern passes the name check but not the shape probe, which runs on a
    dummy context before the token stream fixes the harvest's settings (in a Ray task when
    sharded, as the model is not loaded here), so the corrected command just runs."""
    bad = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=["blocks.0.attn.hook_pattern"])
    assert main([*cli_args(bad), f"shards={shards}"]) == 2
    assert "choose a per-token hook" in _one_line_error(capsys)
    as_many_heads = replace(bad, context=2)  # (batch, head, query, key): 2 heads as 2 tokens
    assert main([*cli_args(as_many_heads), f"shards={shards}"]) == 2
    assert "choose a per-token hook" in _one_line_error(capsys)
    assert not (tmp_path / "h" / harvest.PARAMS_FILE).exists()
    assert (
        main([*cli_args(tiny_cfg(tiny_model_dir, text_file, tmp_path / "h")), f"shards={shards}"])
        == 0
    )
    capsys.readouterr()
    typo = replace(bad, hooks=["blocks.1.hook_resid_pst"], store_dir=str(tmp_path / "t"))
    assert main([*cli_args(typo), f"shards={shards}"]) == 2
    assert _one_line_error(capsys).startswith("error: unknown hook 'blocks.1.hook_resid_pst'")


def test_a_cuda_harvest_on_a_cluster_without_gpus_is_refused(
    ray_cluster, tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """(Ray would wait for a GPU forever.)"""
    monkeypatch.setattr(ray_cluster, "cluster_resources", lambda: {"CPU": 2.0})
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", shards=2, device="cuda")
    with pytest.raises(StoreError, match="device=cuda but the Ray cluster has no GPUs"):
        run_harvest(cfg)


def test_leftovers_of_a_killed_first_write_are_no_foreign_files(
    tiny_model_dir, text_file, tmp_path
):
    root = tmp_path / "h"
    root.mkdir()
    (root / f".{harvest.PARAMS_FILE}.x8k2.tmp").write_text("{")
    (root / ".write-probe.abc").write_text("")
    cfg = tiny_cfg(tiny_model_dir, text_file, root, hooks=HOOKS[:1], rows=620)
    assert run_harvest(cfg)[HOOKS[0]].total_rows == 620


def test_a_removed_relative_dataset_still_names_the_same_harvest(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """A resume needs the tokens on disk, not the text."""
    monkeypatch.chdir(tmp_path)
    Path("docs.txt").write_bytes(text_file.read_bytes())
    cfg = tiny_cfg(tiny_model_dir, Path("docs.txt"), Path("h"), hooks=HOOKS[:1], rows=620)
    run_harvest(cfg)
    Path("docs.txt").unlink()
    assert run_harvest(cfg)[HOOKS[0]].total_rows == 620


def test_a_full_disk_while_writing_tokens_says_so(
    tiny_model_dir, text_file, tmp_path, capsys, monkeypatch
):
    """A disk that fills while the harvest writes (another writer took the space its check
    saw free: the check is off here to reach the writes)."""
    import subprocess

    monkeypatch.setattr(harvest, "check_disk_space", lambda *a: None)

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        assert main(cli_args(tiny_cfg(tiny_model_dir, text_file, mnt / "h"))) == 2
        assert "no space left" in _one_line_error(capsys).lower()
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_chunks_lost_from_a_complete_harvest_are_harvested_again(
    tiny_model_dir, text_file, tmp_path, caplog
):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h")
    run_harvest(cfg)
    clean = _snapshot(tmp_path / "h")
    a, b = (tmp_path / "h" / h for h in HOOKS)
    identity = [ChunkStore(a).identity, ChunkStore(b).identity]  # what sweeps on it recorded
    (a / chunk_name(3)).unlink()
    (b / chunk_name(1)).write_bytes((b / chunk_name(1)).read_bytes()[:100])
    kept = (a / chunk_name(0)).stat().st_mtime_ns
    with pytest.raises(StoreError, match="missing; re-run the 'sweep harvest' command"):
        ChunkStore(a)  # what a data=chunks sweep on it says
    with caplog.at_level("WARNING", logger="sweep.activations.harvest_dir"):
        stores = run_harvest(cfg)
    assert "1 damaged chunk(s)" in caplog.text and "harvesting them again" in caplog.text
    assert _snapshot(tmp_path / "h") == clean
    assert (a / chunk_name(0)).stat().st_mtime_ns == kept  # only the lost ones were written
    assert [stores[h].identity for h in HOOKS] == identity


@pytest.mark.parametrize("stream", ["damaged", "lost"])
def test_a_complete_harvest_that_lost_chunks_and_its_token_stream_makes_both_again(
    tiny_model_dir, text_file, tmp_path, stream, caplog
):
    """The token stream is made again from the text (the one recorded, by its sha256), then
    the lost chunks from it; with the text changed since, nothing is touched."""
    docs = tmp_path / "docs.txt"
    docs.write_bytes(text_file.read_bytes())
    cfg = tiny_cfg(tiny_model_dir, docs, tmp_path / "h")
    run_harvest(cfg)
    tokens_file = tmp_path / "h" / harvest.TOKENS_FILE
    clean, tokens = _snapshot(tmp_path / "h"), tokens_file.read_bytes()
    (tmp_path / "h" / HOOKS[0] / chunk_name(2)).unlink()
    if stream == "lost":
        tokens_file.unlink()
    else:
        tokens_file.write_bytes(tokens[:-8] + b"XXXXXXXX")
    docs.write_text("A changed start. " + docs.read_text())  # (the stream is its head)
    before = {p: p.read_bytes() for p in (tmp_path / "h").rglob("*") if p.is_file()}
    with pytest.raises(StoreError, match=r"cannot be made again as it was \(.* changed since\)"):
        run_harvest(cfg)
    assert {p: p.read_bytes() for p in (tmp_path / "h").rglob("*") if p.is_file()} == before
    docs.write_bytes(text_file.read_bytes())
    with caplog.at_level("WARNING", logger="sweep.activations.harvest"):
        run_harvest(cfg)
    assert "made again from" in caplog.text
    assert _snapshot(tmp_path / "h") == clean and tokens_file.read_bytes() == tokens


def test_a_repair_that_cannot_run_touches_nothing(tiny_model_dir, text_file, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = tiny_cfg(model, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    store = run_harvest(cfg)[HOOKS[0]].path
    (store / chunk_name(1)).unlink()
    before = {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()}
    model.rename(tmp_path / "moved")
    with pytest.raises(SweepError, match="does not exist"):
        run_harvest(cfg)
    assert {p.name: p.read_bytes() for p in store.iterdir() if p.is_file()} == before


def test_a_chunk_that_cannot_be_read_is_not_taken_for_damaged(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """(EIO, ENOMEM under an address-space limit, permissions: the chunk may be fine.)"""
    import errno

    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    store = run_harvest(cfg)[HOOKS[0]].path
    real_load = np.load

    def unreadable(f, *a, **k):
        if Path(f).name == chunk_name(1):
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real_load(f, *a, **k)

    monkeypatch.setattr(np, "load", unreadable)
    with pytest.raises(StoreError, match="Cannot allocate memory"):
        run_harvest(cfg)
    assert (store / chunk_name(1)).is_file() and (store / "manifest.json").is_file()


def test_a_torn_chunk_of_an_unfinished_harvest_is_harvested_again(clean_and_cut, tmp_path):
    _, cfg = clean_and_cut
    torn = tmp_path / "cut" / HOOKS[0] / chunk_name(0)
    copy = torn.with_name("chunk_00000.orig.npy")  # a user's copy beside it: not a chunk
    copy.write_bytes(torn.read_bytes()[:200])
    torn.write_bytes(torn.read_bytes()[:300])  # damaged since it was written (with its stats)
    run_harvest(cfg)
    assert len(copy.read_bytes()) == 200  # (left as it was)
    copy.unlink()
    assert _snapshot(tmp_path / "cut") == _snapshot(tmp_path / "clean")


def test_a_repair_whose_chunks_differ_leaves_the_store_as_it_was(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """(As chunks harvested again on other hardware could.) Every store is settled first."""
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h")
    stores = run_harvest(cfg)
    manifests = {h: (s.path / "manifest.json").read_bytes() for h, s in stores.items()}
    for s in stores.values():
        (s.path / chunk_name(2)).unlink()
    real_fill = harvest._fill_group

    def other_bits(*args):
        return {h: b + 1e-2 for h, b in real_fill(*args).items()}

    monkeypatch.setattr(harvest, "_fill_group", other_bits)
    with pytest.raises(StoreError, match="differ from the lost ones") as err:
        run_harvest(cfg)
    for h, s in stores.items():
        assert f"{s.path}: 2" in str(err.value)
        assert (s.path / "manifest.json").read_bytes() == manifests[h]
        assert not (s.path / chunk_name(2)).exists() and (s.path / chunk_name(3)).exists()
    monkeypatch.setattr(harvest, "_fill_group", real_fill)
    assert {h: s.identity for h, s in run_harvest(cfg).items()} == {
        h: s.identity for h, s in stores.items()
    }


def test_a_store_without_chunk_checksums_is_repaired_too(tiny_model_dir, text_file, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1])
    path = run_harvest(cfg)[HOOKS[0]].path
    manifest = json.loads((path / "manifest.json").read_text())
    for entry in manifest["chunks"]:  # as written before chunk checksums existed
        del entry["sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / chunk_name(2)).unlink()
    assert run_harvest(cfg)[HOOKS[0]].total_rows == cfg.rows


def test_a_repair_with_another_shard_count_keeps_every_stores_identity(
    ray_cluster, tiny_model_dir, text_file, tmp_path
):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", shards=2)
    stores = run_harvest(cfg)
    manifests = {h: (s.path / "manifest.json").read_bytes() for h, s in stores.items()}
    (stores[HOOKS[0]].path / chunk_name(2)).unlink()  # one hook's store only
    run_harvest(replace(cfg, shards=1))
    assert {h: (s.path / "manifest.json").read_bytes() for h, s in stores.items()} == manifests


def test_a_context_longer_than_the_model_takes_is_one_line(
    tiny_model_dir, text_file, tmp_path, capsys
):
    assert main(cli_args(tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", context=128))) == 2
    assert "context=128 is longer than model" in _one_line_error(capsys)
    assert not (tmp_path / "h").exists()  # the store_dir it made is gone again


def test_a_repair_killed_before_a_chunks_stats_file_is_finished_by_the_next_run(
    tiny_model_dir, text_file, tmp_path
):
    """(Its .npy written, its .json not: the chunk's bits are unknown until it is redone.)
    The LM-eval tokens, lost too, come back with it."""
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1])
    store = run_harvest(cfg)[HOOKS[0]]
    files = {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()}
    (store.path / chunk_name(2)).with_suffix(".json").unlink()
    (store.path / harvest.EVAL_TOKENS_FILE).unlink()
    assert run_harvest(cfg)[HOOKS[0]].identity == store.identity
    assert {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()} == files


def test_lm_eval_tokens_changed_since_the_harvest_are_written_again(
    tiny_model_dir, text_file, tmp_path, caplog
):
    """(They decide the LM metrics of every sweep on the store: changed by hand, those would
    change silently.)"""
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1])
    store = run_harvest(cfg)[HOOKS[0]]
    files = {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()}
    held_out = store.path / harvest.EVAL_TOKENS_FILE
    np.save(held_out, np.load(held_out)[::-1])
    with caplog.at_level("WARNING", logger="sweep.activations.harvest"):
        assert run_harvest(cfg)[HOOKS[0]].identity == store.identity
    assert (
        "LM-eval tokens lm_eval_tokens.npy holds other bits than the manifest records"
        in caplog.text
    )
    assert {p.name: p.read_bytes() for p in store.path.iterdir() if p.is_file()} == files


def test_lm_eval_tokens_that_cannot_be_written_again_leave_the_store_usable(
    tiny_model_dir, text_file, tmp_path, caplog
):
    """(Its token stream gone too: the chunks, hours of a real model's work, are fine; sweeps
    on it skip their LM metrics, with the reason.)"""
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1])
    store = run_harvest(cfg)[HOOKS[0]]
    (tmp_path / "h" / harvest.TOKENS_FILE).unlink()
    (store.path / harvest.EVAL_TOKENS_FILE).unlink()
    with caplog.at_level("WARNING", logger="sweep.activations.harvest"):
        assert run_harvest(cfg)[HOOKS[0]].identity == store.identity
    assert "lm_eval_tokens.npy is missing or unreadable, and" in caplog.text
    assert "sweeps on it skip their LM metrics" in caplog.text
    assert not (store.path / harvest.EVAL_TOKENS_FILE).exists()


def test_lm_eval_tokens_of_a_read_only_store_are_left_with_a_warning(
    tiny_model_dir, text_file, tmp_path, caplog, monkeypatch
):
    """(A shared store, read-only: reused as it is. Root writes through file modes, so the
    refusal is simulated.)"""
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h")
    stores = run_harvest(cfg)
    held_out = stores[HOOKS[1]].path / harvest.EVAL_TOKENS_FILE
    held_out.unlink()
    hook_folder = str(stores[HOOKS[1]].path)
    monkeypatch.setattr(harvest.os, "access", lambda p, mode: str(p) != hook_folder)
    with caplog.at_level("WARNING", logger="sweep.activations.harvest"):
        assert {h: s.identity for h, s in run_harvest(cfg).items()} == {
            h: s.identity for h, s in stores.items()
        }
    assert "or is read-only: sweeps on it skip their LM metrics" in caplog.text
    assert not held_out.exists()


def test_a_damaged_stats_file_of_an_unfinished_harvest_is_no_traceback(clean_and_cut, tmp_path):
    _, cfg = clean_and_cut
    (tmp_path / "cut" / HOOKS[0] / chunk_name(0)).with_suffix(".json").write_text('{"rows": 5')
    run_harvest(cfg)
    assert _snapshot(tmp_path / "cut") == _snapshot(tmp_path / "clean")


def test_tokens_come_from_the_models_own_tokenizer(text_file, tmp_path, capsys):
    """A tokenizer without BOS or EOS: the bridge's copy gains an ``<|endoftext|>`` token, so
    one in-process shard tokenised differently from several Ray shards. Both use the saved one."""
    from transformers import AutoTokenizer

    model_dir = save_tiny_gpt2(tmp_path / "plain", special=False)
    capsys.readouterr()  # transformers' saving bar
    cfg = tiny_cfg(model_dir, text_file, tmp_path / "h", rows=600, lm_eval_tokens=0)
    assert main(cli_args(cfg)) == 2
    assert "tokenizer has no BOS or EOS token; set prepend_bos=false" in _one_line_error(capsys)
    run_harvest(replace(cfg, prepend_bos=False, drop_bos=False))
    plan = HarvestPlan.of(replace(cfg, prepend_bos=False, drop_bos=False))
    want = text.token_contexts(
        text.iter_documents(str(text_file)),
        AutoTokenizer.from_pretrained(model_dir),
        plan.n_contexts,
        cfg.context,
        prepend_bos=False,
    )
    assert np.array_equal(np.load(tmp_path / "h" / harvest.TOKENS_FILE), want)


def test_a_removed_relative_model_folder_still_names_the_same_harvest(
    tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """``model=models/gpt2`` (no ``./``) was recorded as its absolute path; once the folder is
    gone the name alone reads as a hub name, which made the harvest "different settings"."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_model_dir, "models/gpt2")
    cfg = tiny_cfg(Path("models/gpt2"), text_file, Path("h"), hooks=HOOKS[:1], rows=620)
    run_harvest(cfg)
    shutil.rmtree("models")
    assert run_harvest(cfg)[HOOKS[0]].total_rows == 620
    source = {f.name: getattr(cfg, f.name) for f in fields(HarvestSource)}
    data = HarvestDataConfig(**source, hook=HOOKS[0])
    assert harvest.harvested_store(data, "h", cfg.launch) is not None


def test_a_sweeps_harvest_names_data_path_in_its_errors(
    ray_cluster, tiny_model_dir, text_file, tmp_path, capsys
):
    """``sweep harvest`` calls the folder store_dir; a data=harvest sweep's user set data.path."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = sweep_args(tiny_model_dir, text_file, tmp_path / "sw")
    assert main([*args, f"data.path={afile}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: data.path {afile} is a file") and "store_dir" not in err, err


def test_a_harvest_larger_than_its_disk_is_refused_before_anything_is_written(
    ray_cluster, tiny_model_dir, text_file, tmp_path, capsys
):
    """Rows x the hooks' widths (known from the dummy context's probe) x the stored dtype,
    against the disk's free space: not a disk filled to the last chunk hours later."""
    huge = replace(tiny_cfg(tiny_model_dir, text_file, tmp_path / "h"), rows=10**13)
    assert main(cli_args(huge)) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: {tmp_path / 'h'} needs about ") and "GiB free; lower rows" in err
    assert not (tmp_path / "h" / harvest.PARAMS_FILE).exists()
    args = sweep_args(tiny_model_dir, text_file, tmp_path / "sw")
    assert main([*args, "data.rows=10000000000000"]) == 2
    assert "or pass data.path=<a folder on a larger disk>" in _one_line_error(capsys)


def test_activations_beyond_float16_are_refused_naming_the_dtype_to_use(
    tiny_model_dir, text_file, tmp_path, capsys, monkeypatch
):
    """A residual stream reaching past 65504 would be stored as inf in float16: refused in
    one line naming bfloat16, which holds it (not the store's "NaN or inf" refusal)."""
    real = lm.capture
    monkeypatch.setattr(lm, "capture", lambda *a: {h: x * 1e6 for h, x in real(*a).items()})
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    assert main(cli_args(cfg)) == 2
    err = _one_line_error(capsys)
    assert "beyond float16's largest value 65504" in err and "dtype=bfloat16" in err
    wide = replace(cfg, store_dir=str(tmp_path / "b"))
    assert main([*cli_args(wide), "dtype=bfloat16"]) == 0
    assert ChunkStore(tmp_path / "b").read_rows(0).abs().amax() > 65504


def test_a_model_whose_float16_forward_overflows_is_refused_naming_the_hook_and_fix(
    tiny_model_dir, text_file, tmp_path, capsys
):
    """Embeddings 1e6 times larger: the float16 model's own activations reach inf. Refused at
    the first batch naming the hook and the model_dtype to use, not as a chunk of "NaN or
    inf values" once a group had gone through the model."""
    from transformers import GPT2LMHeadModel

    big = tmp_path / "big"
    model = GPT2LMHeadModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(1e6)
    model.save_pretrained(big)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_model_dir / name).is_file():
            shutil.copy(tiny_model_dir / name, big / name)
    capsys.readouterr()  # (save_pretrained's progress bar, where tqdm was on at import)
    cfg = tiny_cfg(big, text_file, tmp_path / "h", hooks=["blocks.0.hook_resid_pre"], rows=620)
    assert main([*cli_args(cfg), "model_dtype=float16"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith("error: blocks.0.hook_resid_pre gives inf values with model_dtype=")
    assert "harvest with model_dtype=bfloat16 (or float32), into a new store_dir" in err
    sweep = [*sweep_args(big, text_file, tmp_path / "sw"), "data.model_dtype=float16"]
    assert main(sweep) == 2  # a data=harvest sweep names its own fields
    assert "harvest with data.model_dtype=bfloat16 (or float32), into a new data.path (the " \
        "harvest in" in _one_line_error(capsys)  # fmt: skip


def test_a_second_harvest_into_a_store_dir_being_harvested_is_refused(
    tiny_model_dir, text_file, tmp_path, capsys
):
    """Two harvests into one store_dir would each remove the other's writes in progress: the
    second is refused in one line and touches nothing; once the first ends it just runs."""
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    with harvest_dir.writing(tmp_path / "h"):  # another harvest, between two of its writes
        (tmp_path / "h" / ".chunk_00000.npy.x.tmp").write_bytes(b"half a chunk")
        assert main(cli_args(cfg)) == 2
        assert "another harvest is writing store_dir" in _one_line_error(capsys)
        assert [p.name for p in (tmp_path / "h").iterdir()] == [".chunk_00000.npy.x.tmp"]
    assert main(cli_args(cfg)) == 0


@pytest.mark.parametrize("value", [b"\x00\x3c", b"\x00\x7e"], ids=["one", "nan"])
def test_a_harvested_chunk_changed_in_place_names_the_repair_that_works(
    tiny_model_dir, text_file, tmp_path, value
):
    """A chunk whose bytes changed (same size) fails verification; the message says what
    mends it: delete it and re-run the harvest, which writes just that chunk again. (A NaN
    written into it too: it was said as a store holding NaN, with a repair that did nothing.)"""
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    store = run_harvest(cfg)[HOOKS[0]]
    clean, f = _snapshot(store.path), store.path / chunk_name(1)
    data = bytearray(f.read_bytes())
    data[-2:] = value  # the last value: 1.0 or NaN in float16
    f.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="fails its checksum .*; delete it and re-run the 'sweep"):
        ChunkStore(store.path).verify()
    f.unlink()
    run_harvest(cfg)[HOOKS[0]].verify()
    assert _snapshot(store.path) == clean


def test_a_harvest_settings_file_holding_no_settings_is_one_line(
    tiny_model_dir, text_file, tmp_path, capsys
):
    cfg = tiny_cfg(tiny_model_dir, text_file, tmp_path / "h", hooks=HOOKS[:1], rows=620)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / harvest.PARAMS_FILE).write_text("null")
    assert main(cli_args(cfg)) == 2
    assert "harvest-params.json is unreadable (it holds a NoneType" in _one_line_error(capsys)
