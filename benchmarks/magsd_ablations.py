"""Every ablation row of the MAG-SD paper (Tables III-VIII) on the cxr-covid fixed split.

Rows, one config each (configs/magsd_cxr*.yaml), each changing one thing of the proposed model:
CLAHE on/off (Table IV); attention scales 7 / 7+14 / 7+14+28 (Table V); attention pooling vs
GAP vs GMP (Table VI); no attention guided augmentation (Table III, MAG-SD(0AUG)), mixup,
mixup + dimming, all three (Table VII); soft distance vs L2 (Table VIII).

    python benchmarks/magsd_ablations.py            # reduced setting, for this CPU (< 90 min)
    python benchmarks/magsd_ablations.py --full     # the configs as written (224 px, 100 epochs): a GPU

Reduced setting (recorded in the JSON): 96 px, 2 epochs, 256 training images drawn once
(seeded, the same for every row), AdamW; validation and test splits whole. Differences between
rows in that setting are mostly noise: read the CIs.
Writes benchmarks/results/magsd_ablations.json and .md (to --out instead with --set or --only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_magsd import HEADLINE, train_and_test  # noqa: E402

ROWS = [  # (table, row label, config)
    ("IV / V / VI / VII / VIII", "proposed (CLAHE, 7+14, attention pooling, 3 augmentations, soft distance)",
     "magsd_cxr.yaml"),
    ("IV", "without CLAHE", "magsd_cxr_no_clahe.yaml"),
    ("V", "attention scales 7", "magsd_cxr_scales_7.yaml"),
    ("V", "attention scales 7+14+28", "magsd_cxr_scales_7_14_28.yaml"),
    ("VI", "GAP", "magsd_cxr_gap.yaml"),
    ("VI", "GMP", "magsd_cxr_gmp.yaml"),
    ("III", "MAG-SD(0AUG)", "magsd_cxr_aug_none.yaml"),
    ("VII", "mixup", "magsd_cxr_aug_mixup.yaml"),
    ("VII", "mixup + dimming", "magsd_cxr_aug_mixup_dimming.yaml"),
    ("VIII", "L2 regularization", "magsd_cxr_l2.yaml"),
]
REDUCED = ["preprocess.size=96", "train.epochs=2", "train.limit_per_split=256", "train.optimizer=adamw",
           "train.lr=3.0e-4", "train.weight_decay=1.0e-2", "train.patience=2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the configs as written (for a GPU)")
    parser.add_argument("--only", action="append", default=[], help="run only rows whose config contains this")
    parser.add_argument("--set", action="append", default=[], help="config override for every row")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "magsd_ablations")
    args = parser.parse_args()
    overrides = ([] if args.full else list(REDUCED)) + list(args.set)

    import torch

    from chestdx.utils import write_json_atomic, write_text_atomic

    started = time.time()
    result = {"setting": {"mode": "full" if args.full else "reduced", "backbone": "efficientnet_lite0",
                          "overrides": overrides, "device": "cuda" if torch.cuda.is_available() else "cpu",
                          "threads": torch.get_num_threads()}, "rows": []}
    for table, label, config in ROWS:
        if args.only and not any(o in config for o in args.only):
            continue
        print(f"== Table {table}: {label} ({config})", flush=True)
        run = train_and_test(config, args.out / Path(config).stem, overrides, n_boot=500)
        result["rows"].append({"table": table, "row": label, "config": f"configs/{config}",
                               "test": run["test"], "validation": run["validation"],
                               "best_epoch": run["best_epoch"], "train_seconds": run["train_seconds"]})
    result["seconds_total"] = time.time() - started
    # Trials (--set overrides, --only some rows) stay beside their runs; the committed file is the full run's.
    out = (args.out if args.set or args.only else ROOT / "benchmarks" / "results") / "magsd_ablations.json"
    print(f"results: {out}", file=sys.stderr)
    write_json_atomic(out, result)
    write_text_atomic(out.with_suffix(".md"), markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    s = result["setting"]
    lines = [f"# MAG-SD ablations on cxr-covid, {s['mode']} setting ({s['device']})", "",
             f"Overrides: `{' '.join(s['overrides']) or 'none'}`. Test split, 95% patient-bootstrap CIs.", "",
             "| table | row | " + " | ".join(HEADLINE) + " | train s |", "| --- | --- |" + " --- |" * (len(HEADLINE) + 1)]
    for r in result["rows"]:
        t = r["test"]
        cells = [f"{100 * t[m]:.1f} [{100 * t[m + '_ci'][0]:.1f}, {100 * t[m + '_ci'][1]:.1f}]" for m in HEADLINE]
        lines.append(f"| {r['table']} | {r['row']} | " + " | ".join(cells) + f" | {r['train_seconds']:.0f} |")
    lines += ["", f"Total: {result['seconds_total'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from chestdx.errors import ChestDxError

    try:
        main()
    except ChestDxError as err:  # a run folder from other settings, missing data or weights: one line
        sys.exit(f"error: {err}")
