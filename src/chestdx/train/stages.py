"""Multi-stage training: a config's `stages:` list, run stage after stage (AG-CNN's Algorithm 1
trains the global branch, then the local one with the global frozen, then the fusion).

Stage k trains in `<run_dir>/stage<k>_<name>`, its config the main one updated by the stage's
sections, its weights initialised from stage k-1's bundle, and the modules named in its
`freeze:` list kept fixed (`FreezeModules`). Each stage is an ordinary run folder, so a killed
run resumes where it was: finished stages are kept, the interrupted one resumes from its last
checkpoint. The last stage's bundle is `<run_dir>/model.pt`; `stages.json` lists the stages.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from chestdx.errors import ChestDxError
from chestdx.train import runfolder
from chestdx.train.config import deep_merge
from chestdx.utils import atomic_path, write_json_atomic

STAGE_SECTIONS = ("train", "augment", "preprocess", "method", "evaluate", "data")


def stage_configs(cfg: dict) -> list[tuple[str, dict, list]]:
    """(folder name, config, freeze prefixes) per stage, in order."""
    base = {k: v for k, v in cfg.items() if k != "stages"}
    out = []
    for k, stage in enumerate(cfg["stages"]):
        update = {s: stage[s] for s in STAGE_SECTIONS if s in stage}
        stage_cfg = deep_merge(base, update)
        stage_cfg["name"] = f"{cfg.get('name', 'experiment')}/{stage['name']}"
        out.append((f"stage{k}_{stage['name']}", stage_cfg, list(stage.get("freeze") or [])))
    return out


def fit_stages(cfg: dict, run_dir: Path, progress: bool = True, manifest=None) -> Path | None:
    from chestdx.train.run import fit, is_main_process, prepare_config, run_fingerprint

    stages = stage_configs(cfg)
    previous = None
    for folder, stage_cfg, freeze in stages:  # every folder checked before any stage trains
        if int(stage_cfg["train"].get("ensemble") or 1) > 1:
            raise ChestDxError(f"stage {folder}: train.ensemble > 1 cannot be one stage of a multi-stage run")
        prepare_config(stage_cfg)
        runfolder.check(run_dir / folder, stage_cfg, run_fingerprint(stage_cfg, manifest, previous, freeze))
        previous = run_dir / folder / "model.pt"
    previous, retrained, done = None, False, []
    for folder, stage_cfg, freeze in stages:
        stage_dir = run_dir / folder
        path = stage_dir / "model.pt"
        finished = runfolder.finished(stage_dir, stage_cfg)
        if retrained and finished:  # trained from an older version of the stage before it
            raise ChestDxError(f"{stage_dir} was trained from an earlier {previous.parent.name}, which has just "
                               "trained again: delete that folder to retrain the stage from it")
        if not finished:
            retrained = True
            path = fit(copy.deepcopy(stage_cfg), stage_dir, progress, manifest=manifest, init_from=previous,
                       freeze=freeze)
        done.append({"stage": folder, "freeze": freeze, "model": str(path)})
        previous = path
    final = run_dir / "model.pt"
    if not is_main_process():
        return final
    with atomic_path(final) as tmp:
        shutil.copyfile(previous, tmp)
    write_json_atomic(run_dir / "stages.json", done)
    summary = Path(previous).parent / "train_summary.json"
    if summary.is_file():
        shutil.copyfile(summary, run_dir / "train_summary.json")
    return final
