"""Dead-latent remedies switched on that cannot act in the sweep's schedule are warned about."""

from __future__ import annotations

import itertools

from sweep import archs
from sweep.cli import main
from sweep.dead_schedule import never_acts_note
from sweep.worker import _resample_due
from tests.conftest import tiny_train
from tests.test_sweep_e2e import TINY


def test_the_resampling_note_agrees_with_the_worker_schedule():
    """Warned exactly when no step the worker resamples at has trained ``dead_tokens`` rows
    (resampling after step s has seen s batches)."""
    untied = archs.get("untied")
    for steps, every, stop, dead in itertools.product(
        (1, 2, 10, 38, 140), (1, 3, 19, 35), (0.1, 0.5, 1.0), (1, 256, 5000, 20000)
    ):
        t = tiny_train(resample_dead=every, resample_stop=stop, dead_tokens=dead)
        acts = any(
            _resample_due(t, s, steps) and s * t.batch_size >= dead for s in range(1, steps + 1)
        )
        note = never_acts_note(t, untied, steps)
        assert (note is None) == acts, (steps, every, stop, dead, note)


def test_an_auxk_weight_set_by_hand_that_cannot_act_is_named():
    topk, short = archs.get("topk"), tiny_train(auxk_alpha=0.5, dead_tokens=10_000)
    note = never_acts_note(short, topk, 20)
    assert note is not None and "train.auxk_alpha=0.5 never acts here" in note
    assert "the last step comes after 4,864" in note and "lower train.dead_tokens" in note
    assert never_acts_note(short, topk, 100) is None  # long enough
    assert never_acts_note(tiny_train(dead_tokens=10_000), topk, 20) is None  # the default weight
    assert never_acts_note(short, archs.get("untied"), 20) is None  # no AuxK there


def test_a_sweep_that_cannot_resample_says_so(ray_cluster, tmp_path, capsys):
    """Said before training; not by the evaluation of the finished sweep (it trains nothing)."""
    sw = tmp_path / "sw"
    args = ["grid.l1=[0.3]", "grid.dict_ratio=[1]", "train.resample_dead=10"]
    assert main(["run", f"sweep_dir={sw}", *TINY, *args]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "train.resample_dead=10 never resamples here" in said
    assert "train.dead_tokens=10,000,000 rows" in said
    assert main(["evaluate", str(sw)]) == 0
    assert "never resamples" not in capsys.readouterr().err


def test_a_plan_says_it_before_the_synthetic_store_is_made(tmp_path, capsys):
    """``--plan`` on a new synthetic sweep counts the steps from the store's config."""
    args = ["grid.l1=[0.3]", "grid.dict_ratio=[1]", "train.resample_dead=10"]
    assert main(["run", "--plan", f"sweep_dir={tmp_path / 'sw'}", *TINY, *args]) == 0
    said = " ".join(capsys.readouterr().err.split())
    assert "train.resample_dead=10 never resamples here" in said
    assert "(step 10 of 38, train.resample_stop=0.5)" in said and not (tmp_path / "sw").exists()
