"""A run folder belongs to one experiment: reusing it with other settings or data is refused."""

import copy
import json

import pytest

from chestdx.errors import ChestDxError
from chestdx.train import runfolder
from chestdx.train.config import load_config


def _cfg(*overrides):
    return load_config("configs/ladnn_covidct.yaml", list(overrides))


def test_same_settings_pass_and_the_spec_is_recorded(tmp_path):
    runfolder.claim(tmp_path, _cfg(), "fp")
    spec = json.loads((tmp_path / runfolder.SPEC_FILE).read_text())
    assert spec["data_fingerprint"] == "fp" and spec["settings"]["train.lr"] == pytest.approx(5e-4)
    runfolder.claim(tmp_path, _cfg(), "fp")  # a re-run of the same command resumes


def test_other_learning_rate_or_data_is_refused_naming_folder_and_setting(tmp_path):
    runfolder.claim(tmp_path, _cfg(), "fp")
    with pytest.raises(ChestDxError, match=r"train\.lr: 0\.0005 there, 0\.001 now") as err:
        runfolder.claim(tmp_path, _cfg("train.lr=1e-3"), "fp")
    assert str(tmp_path) in str(err.value)
    with pytest.raises(ChestDxError, match="other data"):
        runfolder.claim(tmp_path, _cfg(), "another-fingerprint")
    with pytest.raises(ChestDxError, match=r"augment\.scale"):
        runfolder.claim(tmp_path, _cfg("augment.scale=[0.8, 1.2]"), "fp")


def test_epochs_may_grow_but_not_shrink_and_evaluation_settings_are_free(tmp_path):
    runfolder.claim(tmp_path, _cfg("train.epochs=2"), "fp")
    runfolder.claim(tmp_path, _cfg("train.epochs=5", "evaluate.tta=false", "train.patience=1"), "fp")
    with pytest.raises(ChestDxError, match=r"train\.epochs: 5 there, 3 now"):
        runfolder.claim(tmp_path, _cfg("train.epochs=3"), "fp")


def test_a_folder_from_before_run_specs_is_checked_against_its_bundle(tmp_path):
    old = _cfg()
    del old["augment"]["translate"]  # a setting added after that bundle was written
    (tmp_path / "train_summary.json").write_text(json.dumps({"config": old, "data_fingerprint": "fp"}))
    runfolder.claim(tmp_path, _cfg(), "fp")
    (tmp_path / runfolder.SPEC_FILE).unlink()
    with pytest.raises(ChestDxError, match=r"model\.dropout"):
        runfolder.claim(tmp_path, _cfg("model.dropout=0.5"), "fp")


def test_finished_needs_a_bundle_trained_for_the_asked_epochs(tmp_path):
    cfg = _cfg("train.epochs=2")
    assert not runfolder.finished(tmp_path, cfg)
    (tmp_path / "model.pt").write_bytes(b"x")
    (tmp_path / "train_summary.json").write_text(json.dumps({"config": copy.deepcopy(cfg)}))
    assert runfolder.finished(tmp_path, cfg)
    assert not runfolder.finished(tmp_path, _cfg("train.epochs=4"))
