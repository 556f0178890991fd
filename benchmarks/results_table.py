"""Print the README's results table from benchmarks/results/reproduce_ladnn.json."""

import json
from pathlib import Path

PAPER = {"baseline": {"auc": 87.7, "accuracy": 77.8, "sensitivity": 68.4, "f1": 74.9},
         "ladnn": {"auc": 90.0, "accuracy": 83.7, "sensitivity": 87.8, "f1": 83.9}}


def main() -> None:
    path = Path(__file__).parent / "results" / "reproduce_ladnn.json"
    result = json.loads(path.read_text())
    print("| model | AUC [95% CI] | accuracy | sensitivity | specificity | F1 | s/epoch | paper (EffNet-b0) AUC / acc / sens / F1 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = [("He et al. baseline", "baseline"), ("LA-DNN", "ladnn")]
    for label, key in rows:
        if key not in result:
            continue
        t = result[key]["test"]
        p = PAPER.get(key)
        paper = f"{p['auc']} / {p['accuracy']} / {p['sensitivity']} / {p['f1']}" if p else "-"
        print(f"| {label} | {100 * t['auc']:.1f} [{100 * t['auc_ci'][0]:.1f}, {100 * t['auc_ci'][1]:.1f}] | "
              f"{100 * t['accuracy']:.1f} | {100 * t['sensitivity']:.1f} | {100 * t['specificity']:.1f} | "
              f"{100 * t['f1']:.1f} | {result[key]['seconds_per_epoch']:.0f} | {paper} |")
    print(f"\nBaseline + LA-DNN wall time: {result['seconds_total'] / 60:.1f} min on {result['setting'].get('cpu_cores', 2)} CPU cores.")
    check = result.get("jpeg_check")
    if check:
        print("\n| LA-DNN, one member (seed 0) | test AUC [95% CI] | test AUC, all test images re-encoded as JPEG | validation AUC |")
        print("| --- | --- | --- | --- |")
        for name, r in check.items():
            lo, hi = r["test_auc_ci"]
            print(f"| {name.replace('_', ' ')} | {100 * r['test_auc']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | "
                  f"{100 * r['shortcut_probe_auc_all_jpeg']:.1f} | {100 * r['validation_auc']:.1f} |")


if __name__ == "__main__":
    main()
