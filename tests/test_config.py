"""Experiment configs: command-line overrides are parsed as YAML values."""

from chestdx.train.config import load_config


def test_overrides_parse_numbers_lists_and_booleans_including_1e_minus_3():
    cfg = load_config("configs/ladnn_covidct.yaml", [
        "train.lr=1e-3", "train.weight_decay=5E-2", "augment.scale=[0.8, 1.2]", "evaluate.tta=false",
        "train.epochs=3", "model.backbone=resnet18"])
    # PyYAML alone reads 1e-3 (no dot) as the string '1e-3', which made lr * 10 a repeated string.
    assert cfg["train"]["lr"] == 1e-3 and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["weight_decay"] == 0.05
    assert cfg["augment"]["scale"] == [0.8, 1.2] and cfg["evaluate"]["tta"] is False
    assert cfg["train"]["epochs"] == 3 and cfg["model"]["backbone"] == "resnet18"
