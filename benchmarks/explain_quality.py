"""How trustworthy are the maps? Randomization SSIM, deletion/insertion AUC and energy in the lungs.

On covid-ct test images (a seeded sample), for the LA-DNN checkpoint from the spine and the
predicted class of each image, per method:
- randomization_ssim: SSIM between the trained model's maps and those of the same network with
  re-initialised weights (lower is better; Grad-CAM++ must be < 0.5);
- deletion_auc / insertion_auc: the class probability as the most-attended pixels are removed
  or inserted (Petsiuk et al. 2018; deletion should be below insertion);
- energy_in_lungs: share of the map inside the classical CT lung mask.
A `random` row (uniform noise maps) gives the chance level for deletion/insertion and energy.

    python benchmarks/explain_quality.py [--checkpoint runs/reproduce_ladnn/ladnn/model.pt]
        [--n-images 48] [--n-scorecam 8]

Writes benchmarks/results/explain_quality.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "runs" / "reproduce_ladnn" / "ladnn" / "model.pt"


def main() -> None:
    from chestdx.data.datasets import get_dataset
    from chestdx.evaluate.metrics import mean_with_ci
    from chestdx.explain import CAM_METHODS, ct_lung_mask, deletion_insertion, energy_share, explain, map_ssim
    from chestdx.explain.run import prepare
    from chestdx.explain.trust import randomized_copy
    from chestdx.inference import Predictor

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    parser.add_argument("--n-images", type=int, default=48)
    parser.add_argument("--n-scorecam", type=int, default=8, help="Score-CAM runs one forward pass per channel")
    parser.add_argument("--steps", type=int, default=16, help="deletion/insertion steps")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "explain_quality.json")
    args = parser.parse_args()
    if not args.checkpoint.exists():
        sys.exit(f"error: {args.checkpoint}: no checkpoint; run `python benchmarks/reproduce_ladnn.py` or `make demo`")

    torch.manual_seed(0)
    predictor = Predictor(args.checkpoint)
    bundle = predictor.bundle
    test = get_dataset("covid-ct").manifest().subset("test")
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(test), size=min(args.n_images, len(test)), replace=False))
    sample = test.take(chosen)
    shown, xs = zip(*(prepare(predictor, p) for p in sample.paths()))
    x = torch.cat(xs)
    patients = sample.patients()
    lungs = [ct_lung_mask(s) for s in shown]
    random_model = randomized_copy(predictor.model, seed=0)
    names = dict(heads=predictor.explain_heads)

    results = {}
    for method in ["random", *CAM_METHODS]:
        n = args.n_scorecam if method == "scorecam" else len(x)
        started = time.time()
        if method == "random":
            trained = explain(predictor.model, x[:n], "gradcam", "predicted", **names)
            maps = rng.random(trained.maps.shape[:1] + trained.maps.shape[2:]).astype(np.float32)
            ssim = None
        else:
            trained = explain(predictor.model, x[:n], method, "predicted", **names)
            maps = trained.maps[:, 0]
            # Same targets for the randomized network: the trained model's predicted columns.
            rand = explain(random_model, x[:n], method, [int(c) for c in sorted(set(trained.columns[:, 0]))], **names)
            pick = [list(rand.columns[0]).index(c) for c in trained.columns[:, 0]]
            ssim = map_ssim(maps, rand.maps[np.arange(n), pick])
        curves = deletion_insertion(predictor.model, x[:n], maps, trained.columns[:, 0], predictor.explain_heads, steps=args.steps)
        energy = [energy_share(m, lung) if lung.any() else np.nan for m, lung in zip(maps, lungs[:n])]
        seconds = time.time() - started
        summary = {key: mean_with_ci(values, patients[:n]) for key, values in
                   (("deletion_auc", curves["deletion_auc"]), ("insertion_auc", curves["insertion_auc"]),
                    ("energy_in_lungs", energy))}
        if ssim is not None:
            summary["randomization_ssim"] = mean_with_ci(ssim, patients[:n])
        results[method] = {**{k: v["mean"] for k, v in summary.items()},
                           "ci": {k: v["ci"] for k, v in summary.items()}, "n_images": n,
                           "seconds_per_image": seconds / n}
        print(method, json.dumps({k: round(v, 3) for k, v in results[method].items() if isinstance(v, float)}),
              file=sys.stderr)

    report = {
        "checkpoint": str(args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT) else args.checkpoint),
        "model": bundle["registry_name"],
        "backbone": bundle["model_kwargs"]["backbone"],
        "validation_auc": bundle.get("validation", {}).get("auc"),
        "dataset": "covid-ct", "split": "test", "target": "predicted class",
        "n_images": len(x), "steps": args.steps, "lung_masks": "classical (chestdx.explain.lungs)",
        "lungs_found": int(sum(lung.any() for lung in lungs)),
        "mean_lung_fraction": float(np.mean([lung.mean() for lung in lungs])),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU",
        "methods": results,
        "command": "python benchmarks/explain_quality.py " + " ".join(sys.argv[1:]),
    }
    from chestdx.utils import write_json_atomic

    write_json_atomic(args.out, report)
    print(json.dumps({m: {k: r.get(k) for k in ("randomization_ssim", "deletion_auc", "insertion_auc",
                                                 "energy_in_lungs")} for m, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
