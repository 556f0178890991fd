"""The generalised core on toy data with known answers: a multi-label model trained and evaluated
per label, two stages with a frozen part, a kill between stages, and a 2-process DDP run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chestdx.evaluate.run import evaluate_bundle
from chestdx.models.bundle import load_bundle
from chestdx.train import run as run_module
from chestdx.train import stages as stages_module
from chestdx.train.config import load_config
from chestdx.train.run import fit
from tests.toy import toy_overrides, weights, write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]


class Killed(Exception):
    """Stands for the process being killed between stages."""


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"))


def test_a_three_label_model_trains_and_is_evaluated_per_label(toy_manifest, tmp_path):
    torch.set_num_threads(1)
    cfg = load_config(None, toy_overrides(toy_manifest, epochs=6))
    path = fit(cfg, tmp_path / "run", progress=False)
    _, bundle = load_bundle(path)
    assert bundle["heads"][0]["task"] == "multilabel" and len(bundle["thresholds"]["findings"]) == 3
    metrics = evaluate_bundle(path, tmp_path / "eval", n_boot=50, shortcut_probe=False)
    per = metrics["test"]["per_label"]
    # Squares at known places: a and b are learnable, c is not in the image at all.
    assert per["a"]["auc"] > 0.9 and per["b"]["auc"] > 0.9, per
    assert abs(per["c"]["auc"] - 0.5) < 0.3
    assert per["c"]["positives"] + per["c"]["negatives"] < metrics["n_test"]  # unknown c rows left out
    assert (tmp_path / "eval" / "report.md").read_text().count("| a |") == 1


def _two_stages(tmp_path: Path, toy_manifest) -> dict:
    stage_yaml = tmp_path / "stages.yaml"
    stage_yaml.write_text("stages:\n  - name: all\n  - name: head_only\n    freeze: [stem]\n"
                          "    train: {epochs: 2, lr: 1.0e-2}\n")
    return load_config(stage_yaml, toy_overrides(toy_manifest, model="toy_binary", epochs=2))


def test_stage_two_starts_from_stage_one_and_leaves_the_frozen_part_bit_identical(toy_manifest, tmp_path):
    torch.set_num_threads(1)
    cfg = _two_stages(tmp_path, toy_manifest)
    final = fit(cfg, tmp_path / "run", progress=False)
    first, _ = load_bundle(tmp_path / "run" / "stage0_all" / "model.pt")
    second, bundle = load_bundle(final)
    for key, value in weights(first, "stem").items():
        assert torch.equal(value, second.state_dict()[key]), key  # BN statistics included
    changed = [k for k, v in weights(first, "head").items() if not torch.equal(v, second.state_dict()[k])]
    assert changed, "stage 2 did not train the head"
    assert bundle["config"]["train"]["lr"] == 1e-2
    assert [s["stage"] for s in json.loads((tmp_path / "run" / "stages.json").read_text())] == \
        ["stage0_all", "stage1_head_only"]


def test_a_kill_between_stages_resumes_at_stage_two(toy_manifest, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    cfg = _two_stages(tmp_path, toy_manifest)
    calls = []
    original = run_module.fit  # fit_stages looks it up on chestdx.train.run at call time

    def killed_in_stage_two(stage_cfg, stage_dir, *args, **kwargs):
        calls.append(Path(stage_dir).name)
        if Path(stage_dir).name.startswith("stage1"):
            raise Killed  # the kill
        return original(stage_cfg, stage_dir, *args, **kwargs)

    monkeypatch.setattr(run_module, "fit", killed_in_stage_two)
    with pytest.raises(Killed):
        stages_module.fit_stages(cfg, tmp_path / "run", progress=False)
    stage0 = tmp_path / "run" / "stage0_all" / "model.pt"
    mtime = stage0.stat().st_mtime_ns
    calls.clear()

    def counted(stage_cfg, stage_dir, *args, **kwargs):
        calls.append(Path(stage_dir).name)
        return original(stage_cfg, stage_dir, *args, **kwargs)

    monkeypatch.setattr(run_module, "fit", counted)  # the re-run after the kill
    stages_module.fit_stages(cfg, tmp_path / "run", progress=False)
    assert calls == ["stage1_head_only"] and stage0.stat().st_mtime_ns == mtime  # stage 1 kept as it was
    assert (tmp_path / "run" / "model.pt").is_file()


def _cli_train(toy_manifest, run_dir, extra=()):
    env = {**os.environ, "CHESTDX_PLUGINS": "tests.toy", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    config = Path(run_dir).parent / f"{Path(run_dir).name}.yaml"
    config.write_text("name: toy\n")
    sets = [f"--set={s}" for s in [*toy_overrides(toy_manifest, model="toy_binary", epochs=5), *extra]]
    cmd = [sys.executable, "-m", "chestdx.cli", "train", "--config", str(config), "--run-dir", str(run_dir),
           "--no-evaluate", *sets]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_two_process_ddp_on_cpu_trains_and_matches_one_process(toy_manifest, tmp_path):
    """gloo DDP with 2 CPU processes: each takes half of every epoch (Lightning's distributed
    sampler), so the runs are not bit-identical; on this separable task both must reach a
    validation AUC within 0.1 of each other and above 0.85."""
    one = _cli_train(toy_manifest, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli_train(toy_manifest, tmp_path / "two", ["trainer.accelerator=cpu", "trainer.devices=2",
                                                       "trainer.strategy=ddp"])
    assert two.returncode == 0, two.stderr[-2000:]
    auc = {name: json.loads((tmp_path / name / "train_summary.json").read_text())["validation"]["auc"]
           for name in ("one", "two")}
    assert auc["one"] > 0.85 and auc["two"] > 0.85 and abs(auc["one"] - auc["two"]) < 0.1, auc
    logged = json.loads((tmp_path / "two" / "train_summary.json").read_text())["config"]["trainer"]
    assert logged["devices"] == 2 and logged["strategy"] == "ddp"
    assert np.isfinite(auc["two"])


def test_ddp_trains_every_member_of_an_ensemble_in_the_same_processes(toy_manifest, tmp_path):
    """Several fits in one DDP run (ensemble members; stages and folds alike): every rank goes on to
    the next fit together, so nothing waits forever for a rank that left."""
    two = _cli_train(toy_manifest, tmp_path / "ens", ["trainer.accelerator=cpu", "trainer.devices=2",
                                                       "trainer.strategy=ddp", "train.ensemble=2", "train.epochs=1"])
    assert two.returncode == 0, two.stderr[-2000:]
    summary = json.loads((tmp_path / "ens" / "train_summary.json").read_text())
    assert [m["seed"] for m in summary["members"]] == [0, 1] and summary["ensemble"] == 2


def test_a_finished_stage_is_not_reused_with_other_settings(toy_manifest, tmp_path):
    torch.set_num_threads(1)
    cfg = _two_stages(tmp_path, toy_manifest)
    fit(cfg, tmp_path / "run", progress=False)
    changed = load_config(tmp_path / "stages.yaml", [*toy_overrides(toy_manifest, model="toy_binary", epochs=2),
                                                     "stages[1].train.lr=0.5"])
    from chestdx.errors import ChestDxError

    with pytest.raises(ChestDxError, match=r"stage1_head_only holds a run with other settings \(train\.lr"):
        fit(changed, tmp_path / "run", progress=False)
    more = load_config(tmp_path / "stages.yaml", toy_overrides(toy_manifest, model="toy_binary", epochs=3))
    with pytest.raises(ChestDxError, match="trained from an earlier stage0_all"):
        fit(more, tmp_path / "run", progress=False)  # stage 0 trains on; stage 1 was trained from the old one
