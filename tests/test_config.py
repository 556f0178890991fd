"""Experiment configs: one schema, every key checked, every default filled, one-line errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import chestdx.models  # noqa: F401  (registers the models and their methods)
from chestdx.errors import ChestDxError
from chestdx.models import get_entry
from chestdx.train.config import DEFAULTS, SECTIONS, STAGE_SECTIONS, load_config, stage_list, validate
from chestdx.train.methods import get_method

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
LADNN = ROOT / "configs" / "ladnn_covidct.yaml"
MAGSD = ROOT / "configs" / "magsd_cxr.yaml"


def error(path=LADNN, overrides=()) -> str:
    with pytest.raises(ChestDxError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_overrides_parse_numbers_lists_and_booleans_including_1e_minus_3():
    cfg = load_config(LADNN, [
        "train.lr=1e-3", "train.weight_decay=5E-2", "augment.scale=[0.8, 1.2]", "evaluate.tta=false",
        "train.epochs=3", "model.backbone=resnet18"])
    # PyYAML alone reads 1e-3 (no dot) as the string '1e-3', which made lr * 10 a repeated string.
    assert cfg["train"]["lr"] == 1e-3 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["weight_decay"] == 0.05
    assert cfg["augment"]["scale"] == [0.8, 1.2] and cfg["evaluate"]["tta"] is False
    assert cfg["train"]["epochs"] == 3 and cfg["model"]["backbone"] == "resnet18"
    # Scientific numbers inside lists and mappings too.
    cfg = load_config(LADNN, ["evaluate.tta_scales=[1e0, 9e-1]", "train.head_weights.lesions=5e-1"])
    assert cfg["evaluate"]["tta_scales"] == [1.0, 0.9] and cfg["train"]["head_weights"] == {"lesions": 0.5}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_with_every_section(path):
    cfg = load_config(path)
    entry = get_entry(cfg["model"]["name"])
    assert set(cfg) >= {"name", "dataset", "model", "preprocess", "augment", "train", "data", "method", "evaluate",
                        "trainer", "stages"}
    assert set(cfg["model"]) == {"name", "pretrained", *entry.options()}
    assert set(cfg["method"]) == set(get_method(entry.method).options)
    assert cfg["name"] == path.stem


def test_the_configs_keep_their_paper_settings_in_the_new_layout():
    ladnn = load_config(LADNN)
    assert ladnn["train"]["head_weights"] == {"lesions": 1.0}
    assert ladnn["method"] == {"negatives_lesion_free": True}
    assert "lesion_weight" not in ladnn["train"] and "negatives_lesion_free" not in ladnn["train"]
    baseline = load_config(ROOT / "configs" / "baseline_covidct.yaml")
    assert baseline["train"]["head_weights"] == {} and baseline["method"] == {"negatives_lesion_free": False}
    magsd = load_config(MAGSD)
    assert magsd["method"]["augmentations"] == ["mixup", "dimming", "patching"]
    assert magsd["method"]["regularization"] == "soft" and "magsd" not in magsd
    l2 = load_config(ROOT / "configs" / "magsd_cxr_l2.yaml")
    assert l2["method"]["regularization"] == "l2"
    assert {k: v for k, v in l2.items() if k not in ("name", "method")} == \
        {k: v for k, v in magsd.items() if k not in ("name", "method")}
    plain = load_config(ROOT / "configs" / "cxr_plain.yaml")  # replace: [model, method, paper]
    assert plain["method"] == {} and "scales" not in plain["model"] and plain["preprocess"]["clahe"] is True
    assert plain["paper"]["source"].startswith("MAG-SD paper Table III, dataset B, ResNet50")


def test_defaults_are_filled_in_from_the_schema_the_model_and_its_method():
    cfg = load_config(MAGSD)
    assert cfg["data"] == {"cache": "memory", "cache_dir": None}
    assert cfg["trainer"] == {"accelerator": "auto", "devices": "auto", "num_nodes": 1, "strategy": "auto",
                              "precision": "auto"}
    assert cfg["stages"] == []
    # magsd_cxr.yaml names every method option; an ablation file changing one keeps the rest.
    assert load_config(ROOT / "configs" / "magsd_cxr_aug_none.yaml")["method"] == {
        "augmentations": [], "regularization": "soft", "augment_per_step": 0, "confidence": 0.7, "smoothing": 0.1}
    # With no file at all, the method's options come from the method.
    bare = load_config(None, ["model.name=magsd"])
    assert bare["method"] == {k: list(v) if isinstance(v, tuple) else v
                              for k, v in get_method("magsd").options.items()}
    assert bare["model"]["scales"] == [7, 14] and bare["model"]["n_maps"] == 32  # registry defaults
    assert bare["model"]["dropout"] == 0.2 and bare["model"]["backbone"] == "efficientnet_lite0"  # as before
    # preprocess: schema < the entry's prescribed preprocessing < the file < --set
    assert bare["preprocess"]["clahe"] is True and bare["preprocess"]["zscore"] is True  # MAG-SD's paper
    assert bare["preprocess"]["clahe_clip"] == 4.0 and bare["preprocess"]["window"] is None
    assert "mean" not in bare["preprocess"] and "std" not in bare["preprocess"]  # filled from the backbone later
    assert load_config(MAGSD, ["preprocess.clahe=false"])["preprocess"]["clahe"] is False
    none = load_config(None)
    assert none["preprocess"]["clahe"] is False and none["model"]["name"] == "ladnn"
    assert none["train"]["optimizer"] == "adamw" and none["train"]["head_lr_factor"] == 10
    assert none["augment"]["affine"] is True and none["augment"]["downscale_factor"] == [0.4, 1.0]
    assert DEFAULTS["train"]["epochs"] == SECTIONS["train"]["epochs"].default == 20


def test_values_of_the_right_type_are_accepted():
    cfg = load_config(LADNN, ["trainer.devices=[0, 1]", "trainer.precision=bf16-mixed", "model.pretrained=null",
                              "augment.affine=0.5", "preprocess.window=[-600, 1500]", "train.lr=1",
                              "data.cache=disk", "data.cache_dir=/tmp/cache"])
    assert cfg["trainer"]["devices"] == [0, 1] and cfg["trainer"]["precision"] == "bf16-mixed"
    assert cfg["model"]["pretrained"] is None and cfg["augment"]["affine"] == 0.5
    assert cfg["preprocess"]["window"] == [-600, 1500] and cfg["train"]["lr"] == 1  # an int is a valid number
    for precision, value in (("32", "32"), ("bf16", "bf16"), ("16-mixed", "16-mixed")):
        assert load_config(LADNN, [f"trainer.precision='{precision}'"])["trainer"]["precision"] == value
    assert load_config(LADNN, ["trainer.precision=32"])["trainer"]["precision"] == 32  # kept as given
    assert load_config(LADNN, ["trainer.devices=2"])["trainer"]["devices"] == 2


@pytest.mark.parametrize("overrides, expected", [
    (["train.lr_factorr=3"], "config: unknown key train.lr_factorr (did you mean train.head_lr_factor?)"),
    (["trian.epochs=1"], "config: unknown section trian (did you mean train?)"),
    (["train.epochs=abc"], "config: train.epochs must be an integer >= 1, got 'abc'"),
    (["train.epochs=true"], "config: train.epochs must be an integer >= 1, got True"),
    (["train.epochs=2.5"], "config: train.epochs must be an integer >= 1, got 2.5"),
    (["data.cache=ram"], "config: data.cache must be one of memory, disk, none, got 'ram'"),
    (["train.optimizer=adagrad"], "config: train.optimizer must be one of adamw, adam, sgd, got 'adagrad'"),
    (["preprocess.resize=crop"], "config: preprocess.resize must be one of pad, stretch, got 'crop'"),
    (["train.limit_per_split=8"],
     "config: train.limit_per_split (8) is below train.batch_size (32): no full training batch"),
    (["train.lr=fast"], "config: train.lr must be a number > 0, got 'fast'"),
    (["augment.affine=1.5"], "config: augment.affine must be true, false or a probability between 0 and 1"),
    (["augment.hflip=yes please"], "config: augment.hflip must be a number between 0 and 1, got 'yes please'"),
    (["augment.scale=[0.9]"], "config: augment.scale must be a [low, high] pair of numbers, got [0.9]"),
    (["preprocess.window=[40]"], "config: preprocess.window must be null or a [center, width] pair of numbers"),
    (["preprocess.clahe=1"], "config: preprocess.clahe must be true or false, got 1"),
    (["trainer.devices=0"], "config: trainer.devices must be 'auto', an integer >= 1 or a list of device indices"),
    (["trainer.precision=bf17"], "config: trainer.precision must be one of auto,"),
    (["train.head_weights=[1, 2]"], "config: train.head_weights must be a mapping of head names to numbers"),
    (["evaluate.tta_scales=1.0"], "config: evaluate.tta_scales must be a list of numbers > 0, got 1.0"),
    (["model.n_maps=16"], "config: unknown key model.n_maps of model ladnn"),
    (["model.dropuot=0.1"], "config: unknown key model.dropuot of model ladnn (did you mean model.dropout?)"),
    (["model.backbone=resnet19"], "config: model.backbone must be one of "),
    (["method.negatives_lesion_fre=true"],
     "config: unknown key method.negatives_lesion_fre of training method ladnn (model ladnn) "
     "(did you mean method.negatives_lesion_free?)"),
    (["paper.year=2020"], "config: unknown key paper.year (valid: source, results)"),
    (["nmae=x"], "config: unknown key nmae (did you mean name?)"),
    # Keys that moved say where to.
    (["train.lesion_weight=1.0"], "config: unknown key train.lesion_weight (moved: now train.head_weights.lesions)"),
    (["magsd.regularization=l2"], "config: unknown section magsd (moved: now method)"),
    (["model=ladnn"], "config: model must be a mapping"),
])
def test_each_problem_is_one_line_naming_the_key(overrides, expected):
    assert error(LADNN, overrides).startswith(expected)


def test_the_method_section_follows_the_model():
    assert error(MAGSD, ["method.negatives_lesion_free=true"]).startswith(
        "config: unknown key method.negatives_lesion_free of training method magsd (model magsd) (valid: ")
    assert error(MAGSD, ["method.augment_per_step=one"]) == \
        "config: method.augment_per_step must be an integer, got 'one'"
    assert error(MAGSD, ["method.augmentations=mixup"]) == \
        "config: method.augmentations must be a list of strings, got 'mixup'"
    assert error(MAGSD, ["model.scales=[7, x]"]) == "config: model.scales must be a list of integers, got [7, 'x']"
    assert load_config(MAGSD, ["method.confidence=1"])["method"]["confidence"] == 1  # an int is a valid float


def test_an_unknown_model_is_the_registrys_one_line_error():
    message = error(LADNN, ["model.name=ladnnn"])
    assert message.startswith("unknown model 'ladnnn'; registered: ") and "ladnn" in message


def test_stages_are_checked_with_the_same_schema_and_named_by_their_path():
    good = ['stages=[{name: global}, {name: local, freeze: [backbone.], train: {lr: 1e-4, epochs: 2}, '
            'method: {negatives_lesion_free: false}}]']
    cfg = load_config(LADNN, good)
    assert stage_list(cfg) == cfg["stages"] == [
        {"name": "global", "freeze": []},
        {"name": "local", "freeze": ["backbone."], "train": {"lr": 1e-4, "epochs": 2},
         "method": {"negatives_lesion_free": False}}]  # partial: the rest comes from the main config
    assert stage_list(load_config(LADNN)) == []
    assert load_config(LADNN, [*good, "stages[1].train.lr=2e-4"])["stages"][1]["train"]["lr"] == 2e-4
    assert load_config(LADNN, [*good, "stages.0.augment.hflip=0"])["stages"][0]["augment"] == {"hflip": 0}

    def stage_error(stages: str) -> str:
        return error(LADNN, [f"stages={stages}"])

    assert stage_error("[{name: a}, {name: b, train: {lr_factor: 2}}]") == \
        "config: unknown key stages[1].train.lr_factor (did you mean stages[1].train.head_lr_factor?)"
    assert stage_error("[{name: a, train: {epochs: abc}}]") == \
        "config: stages[0].train.epochs must be an integer >= 1, got 'abc'"
    assert stage_error("[{name: a, method: {negatives_lesion_fre: true}}]").startswith(
        "config: unknown key stages[0].method.negatives_lesion_fre of training method ladnn")
    assert stage_error("[{name: a, trian: {}}]") == "config: unknown key stages[0].trian (did you mean stages[0].train?)"
    for shared in ("model", "dataset", "trainer", "stages"):
        assert stage_error(f"[{{name: a, {shared}: {{}}}}]").startswith(
            f"config: stages[0].{shared} cannot be set per stage")
    assert stage_error("[{train: {}}]") == "config: stages[0].name is missing: every stage needs a name"
    assert stage_error("[{name: a}, {name: a}]").startswith("config: stages[1].name 'a' repeats stages[0].name")
    assert stage_error("[{name: 3}]") == "config: stages[0].name must be a string, got 3"
    assert stage_error("[{name: a, freeze: backbone}]").startswith("config: stages[0].freeze must be a list of")
    assert stage_error("[{name: a, train: {limit_per_split: 4}}]").startswith(
        "config: stages[0].train.limit_per_split (4) is below stages[0].train.batch_size (32)")
    assert stage_error("{name: a}").startswith("config: stages must be a list")


def test_stage_sections_are_the_ones_the_stage_runner_merges():
    from chestdx.train.stages import STAGE_SECTIONS as RUNNER_SECTIONS

    assert tuple(STAGE_SECTIONS) == tuple(RUNNER_SECTIONS)


def test_file_problems_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    assert error(bad).startswith(f"{bad}: not valid YAML (")
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    assert error(listed).startswith(f"{listed}: a config file must be a mapping")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {LADNN}\nreplace: [model, magsd]\n")
    assert error(child) == f"config: {child}: replace names an unknown section magsd (moved: now method)"
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"base: {LADNN}\ntrain:\n  lr_factor: 3\n")
    assert error(typo) == "config: unknown key train.lr_factor (did you mean train.head_lr_factor?)"
    assert error(tmp_path / "missing.yaml") == f"{tmp_path / 'missing.yaml'}: config file not found"
    for item, message in (("train.epochs", "must look like key.sub=value"),
                          ("train.epochs=[1,", "the value is not valid YAML"),
                          ("train.epochs.x=1", "train.epochs is not a section"),
                          ("stages[0].train.lr=1", "stages[0] does not exist")):
        assert message in error(LADNN, [item])


def test_validate_checks_an_already_merged_mapping():
    assert validate({})["name"] == "experiment"
    with pytest.raises(ChestDxError, match=r"^config: unknown section trian \(did you mean train\?\)$"):
        validate({"trian": {"epochs": 1}})


@pytest.mark.parametrize("override, expected", [
    ("trian.epochs=1", "error: config: unknown section trian (did you mean train?)"),
    ("train.epochs=abc", "error: config: train.epochs must be an integer >= 1, got 'abc'"),
])
def test_the_cli_reports_a_config_error_in_one_line_before_reading_data(tmp_path, override, expected):
    # An empty CHESTDX_HOME: had training got as far as the data, the error would be another one.
    env = dict(os.environ, CHESTDX_HOME=str(tmp_path / "home"), COLUMNS="80")
    proc = subprocess.run([sys.executable, "-m", "chestdx.cli", "train", "--config", "configs/ladnn_covidct.yaml",
                           "--run-dir", str(tmp_path / "run"), "--set", override],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.splitlines() == [expected]
    assert not (tmp_path / "run").exists()
