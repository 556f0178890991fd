"""The input check before the model: how many real chest images it refuses, how many non-chest
inputs it catches.

A reference (`chestdx.data.input_check.fit_reference`, folds by patient) is fitted on the train
split of covid-ct (CT) and, separately, of cxr-covid (CXR). Each is measured on:

- its dataset's test split (and val split): the refusal rate, which must stay under 1 %
  (count, share and a 95 % Wilson interval);
- non-chest inputs: every scikit-image sample picture that loads without a download, in colour
  (where it is colour) and converted to grey, plus synthetic blanks (all-black 8- and 16-bit,
  constant grey levels, white, near-constant, uniform and Gaussian noise, gradients,
  checkerboards, a dot on black), each encoded as a PNG and decoded by chestdx's own reader:
  the catch rate, with the rule that caught each one;
- the other modality's test split (CT reference vs radiographs and vice versa): the share
  caught, reported with no target;
- the rules that need no reference alone (a bundle without one): the same inputs.

    python benchmarks/input_check.py [--max-train N] [--out benchmarks/results/input_check.json]

Prints the JSON and writes it (default benchmarks/results/input_check.json).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {"CT": "covid-ct", "CXR": "cxr-covid"}


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 5), round(min(1.0, centre + half), 5)]


def rate(k: int, n: int) -> dict:
    return {"count": k, "n": n, "share": round(k / n, 5) if n else None, "ci95": wilson(k, n)}


def measured_split(name: str, split: str, max_images: int | None, seed: int):
    """[(label, measures, meta)] and patient ids of one split, each image read by chestdx's reader."""
    from chestdx.data.datasets import get_dataset
    from chestdx.data.input_check import measure
    from chestdx.data.io import read_image

    m = get_dataset(name).manifest().subset(split)
    index = np.arange(len(m))
    if max_images is not None and len(m) > max_images:
        index = np.sort(np.random.default_rng(seed).choice(len(m), size=max_images, replace=False))
    paths, patients = m.paths(), m.patients()
    out = []
    for i in index:
        image = read_image(paths[i])
        started = time.perf_counter()
        measures = measure(image.pixels, image.meta)
        MEASURE_MS.append((time.perf_counter() - started) * 1000)
        out.append((str(paths[i].relative_to(m.root)), measures, image.meta))
    return out, [patients[i] for i in index], len(m)


MEASURE_MS: list[float] = []


def dicom_examples(references: dict) -> dict:
    """Real DICOM files of pydicom-data (where installed), read as the Predictor reads them (a CT in
    the model's lung window), through every rule: what each reference says."""
    try:
        import data_store
    except ImportError:
        return {"skipped": "pydicom-data not installed"}
    from chestdx.data.input_check import NotAChestImage, check_input
    from chestdx.data.io import read_image

    folder = Path(data_store.__file__).parent / "data"
    files = {"693_UNCR.dcm": "head CT (Modality CT, no BodyPartExamined)", "RG1_UNCR.dcm": "chest CR",
             "RG3_UNCR.dcm": "extremity CR (BodyPartExamined EXTREMITY, not passed on by the reader)",
             "MR2_UNCR.dcm": "MR", "US1_UNCR.dcm": "ultrasound"}
    out = {}
    for name, what in files.items():
        if not (folder / name).exists():
            continue
        image = read_image(folder / name, hu_window=[-600, 1500])
        row = {"content": what, "modality": image.meta.get("modality")}
        for modality, ref in references.items():
            try:
                check_input(image, ref, modality)
                row[f"{modality} model"] = "accepted"
            except NotAChestImage as err:
                row[f"{modality} model"] = f"refused ({err.rule}): {err.reason}"
        out[name] = row
    return out


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(arr)  # uint16 (H, W): a 16-bit grey PNG ("I;16")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_uint8(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    return np.zeros(a.shape, np.uint8) if hi <= lo else np.round((a - lo) / (hi - lo) * 255).astype(np.uint8)


def skimage_pictures() -> tuple[list[tuple[str, np.ndarray]], list[str]]:
    """(name, uint8 array) for every scikit-image sample that loads here: colour ones in colour and
    in grey, grey ones once; and the names that did not load."""
    import skimage.data as data

    names = [n for n in getattr(data, "__all__", []) if n not in ("download_all", "data_dir", "lbp_frontal_face_cascade_filename")]
    pictures, skipped = [], []
    for name in sorted(names):
        fn = getattr(data, name, None)
        if not callable(fn):
            continue
        try:
            arr = fn()
        except Exception:
            skipped.append(name)
            continue
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            rgb = to_uint8(arr[..., :3])
            pictures.append((f"{name} (colour)", rgb))
            grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            pictures.append((f"{name} (grey)", np.round(grey).astype(np.uint8)))
        elif arr.ndim == 2 and min(arr.shape) >= 16:
            pictures.append((name, to_uint8(arr)))
        else:
            skipped.append(name)  # volumes, stereo pairs and other non-2D samples
    return pictures, skipped


def synthetic_blanks() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    h, w = 512, 512
    yy, xx = np.mgrid[0:h, 0:w] / 511.0
    out = [("all-black 8-bit", np.zeros((h, w), np.uint8)), ("all-black 16-bit", np.zeros((h, w), np.uint16)),
           ("white 8-bit", np.full((h, w), 255, np.uint8)), ("constant 16-bit 1000", np.full((h, w), 1000, np.uint16)),
           ("all-black RGB", np.zeros((h, w, 3), np.uint8))]
    out += [(f"constant grey {v}", np.full((h, w), v, np.uint8)) for v in (1, 32, 64, 100, 128, 160, 200, 240)]
    out += [(f"near-constant grey 128 +- {d}", (128 + rng.integers(-d, d + 1, (h, w))).astype(np.uint8)) for d in (1, 2)]
    out += [("uniform noise 8-bit", rng.integers(0, 256, (h, w), dtype=np.uint8)),
            ("uniform noise 16-bit", rng.integers(0, 65536, (h, w), dtype=np.uint16)),
            ("uniform noise RGB", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)),
            ("gaussian noise 128 +- 40", np.clip(rng.normal(128, 40, (h, w)), 0, 255).astype(np.uint8)),
            ("horizontal gradient", to_uint8(xx)), ("vertical gradient", to_uint8(yy)),
            ("radial gradient", to_uint8(np.hypot(xx - 0.5, yy - 0.5))),
            ("diagonal gradient 16-bit", np.round((xx + yy) / 2 * 65535).astype(np.uint16))]
    for cell in (8, 32, 64):
        out.append((f"checkerboard {cell} px", to_uint8(((np.arange(h)[:, None] // cell + np.arange(w) // cell) % 2) == 0)))
    dot = np.zeros((h, w), np.uint8)
    dot[250:262, 250:262] = 255
    out.append(("white dot on black", dot))
    return out


def decoded(name: str, arr: np.ndarray):
    from chestdx.data.io import decode_image

    return decode_image(png_bytes(arr), name)


def verdict(m: dict, meta: dict, reference, modality) -> str | None:
    """The rule that refuses the image, or None."""
    from chestdx.data.input_check import NotAChestImage, check_measures

    try:
        check_measures(m, meta, reference, modality)
    except NotAChestImage as err:
        return err.rule
    return None


def summarise(items, reference, modality, keep_names=False) -> dict:
    rules = [verdict(m, meta, reference, modality) for _, m, meta in items]
    k = sum(r is not None for r in rules)
    out = rate(k, len(items))
    by_rule = {}
    for r in rules:
        if r is not None:
            by_rule[r] = by_rule.get(r, 0) + 1
    out["by_rule"] = by_rule
    if keep_names:
        out["refused"] = [name for (name, _, _), r in zip(items, rules) if r is not None]
    return out, rules


def main() -> None:
    from chestdx.data.input_check import (GRID, MAX_COLOUR_FRACTION, PCA_COMPONENTS, REFUSED_SHARE, THUMB,
                                          fit_reference, measure)

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-train", type=int, default=None, help="subsample each train split (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "input_check.json")
    args = parser.parse_args()
    started = time.time()

    pictures, skipped = skimage_pictures()
    non_chest = []
    for name, arr in pictures + synthetic_blanks():
        image = decoded(name, arr)
        non_chest.append((name, measure(image.pixels, image.meta), image.meta))
    n_pictures = len(pictures)

    splits, references = {}, {}
    for modality, name in DATASETS.items():
        train, patients, n_train = measured_split(name, "train", args.max_train, args.seed)
        t0 = time.time()
        references[modality] = fit_reference([m for _, m, _ in train], modality=modality, groups=patients,
                                             seed=args.seed)
        fit_s = time.time() - t0
        splits[modality] = {
            "train": train, "n_train_split": n_train, "fit_s": fit_s,
            "val": measured_split(name, "val", None, args.seed)[0],
            "test": measured_split(name, "test", None, args.seed)[0],
        }

    result = {"benchmark": "input_check", "datasets": DATASETS,
              "settings": {"grid": GRID, "thumbnail": THUMB, "pca_components": PCA_COMPONENTS,
                           "refused_share_target": REFUSED_SHARE, "max_colour_fraction": MAX_COLOUR_FRACTION,
                           "max_train": args.max_train, "seed": args.seed},
              "references": {}, "skimage_not_loaded": skipped}
    for modality, name in DATASETS.items():
        ref, s = references[modality], splits[modality]
        other = "CXR" if modality == "CT" else "CT"
        entry = {"dataset": name, "train_images_used": len(s["train"]), "train_split_size": s["n_train_split"],
                 "fit_seconds": round(s["fit_s"], 2), "limit": ref["limit"],
                 "component_scale": ref["component_scale"], "oof_train_refused": rate(ref["oof_refused"], ref["n_images"]),
                 "oof_distance_quantiles": ref["oof_distance_quantiles"],
                 "reference_json_bytes": len(json.dumps(ref))}
        test, _ = summarise(s["test"], ref, modality, keep_names=True)
        test["target"] = "share < 0.01"
        test["meets_target"] = test["share"] < 0.01
        entry["test_refused"] = test
        entry["val_refused"] = summarise(s["val"], ref, modality, keep_names=True)[0]
        nc, rules = summarise(non_chest, ref, modality)
        nc["pictures"] = summarise(non_chest[:n_pictures], ref, modality)[0]
        nc["synthetic"] = summarise(non_chest[n_pictures:], ref, modality)[0]
        nc["missed"] = [n for (n, _, _), r in zip(non_chest, rules) if r is None]
        entry["non_chest_caught"] = nc
        entry["cross_modality_caught"] = {"images": f"{DATASETS[other]} test ({other})",
                                          **summarise(splits[other]["test"], ref, modality)[0]}
        no_ref_test = summarise(s["test"], None, modality, keep_names=True)[0]
        no_ref_nc, no_ref_rules = summarise(non_chest, None, modality)
        no_ref_nc["missed"] = [n for (n, _, _), r in zip(non_chest, no_ref_rules) if r is None]
        entry["without_reference"] = {"test_refused": no_ref_test, "non_chest_caught": no_ref_nc,
                                      "cross_modality_caught": summarise(splits[other]["test"], None, modality)[0]}
        result["references"][modality] = entry
    result["real_dicom_files"] = dicom_examples(references)
    result["measure_ms_median"] = round(float(np.median(MEASURE_MS)), 2)
    result["non_chest_inputs"] = {"skimage_pictures": n_pictures, "synthetic": len(non_chest) - n_pictures,
                                  "names": [n for n, _, _ in non_chest]}
    result["seconds"] = round(time.time() - started, 1)
    result["machine"] = f"{platform.machine()} CPU, Python {sys.version.split()[0]}"
    try:
        from chestdx.utils import library_versions

        result["libraries"] = library_versions(("numpy", "opencv-python-headless", "pillow", "scikit-image"))
    except Exception:
        pass
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from chestdx.utils import write_text_atomic

    write_text_atomic(args.out, text + "\n")


if __name__ == "__main__":
    main()
