"""Lower precision for the shipped LA-DNN on this CPU: how much faster a forward pass gets, and how far
the answers move, against the fp32 ONNX Runtime export that `chestdx predict` runs.

Variants: ONNX Runtime static int8 (QDQ form, per-channel weights, MinMax calibration on
--calibration-images training images; the QOperator form fails on this graph: "Graph is not a DAG");
OpenVINO in fp32 and in bf16 when the `openvino` package is importable (it is not a chestdx
dependency: `pip install openvino` to measure it). On the covid-ct test split, with mirror TTA and the
validation temperature as shipped: the mean and largest change of the covid probability, decisions
flipped at the shipped threshold, and the AUC; and one ensemble pass per image in batches of
BATCH_SIZE (the least of REPEATS timings over the whole split). None of these is shipped: this
records why.

    python benchmarks/precision.py [--calibration-images 160] [--out benchmarks/results/precision.json]

Needs the shipped recipe's model, runs/external/default/model.pt (`python benchmarks/external.py
--only ladnn --variants default` trains it).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3


class FixedBatch:
    """An OpenVINO graph with its batch fixed, called like chestdx's OnnxModel: x -> dict of tensors
    (a last, partial batch padded with zero rows, which are dropped again)."""

    def __init__(self, run, names, batch: int):
        self.run, self.names, self.batch = run, names, batch

    def __call__(self, x: torch.Tensor, features: bool = False) -> dict:
        image = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        n = len(image)
        if n < self.batch:
            image = np.concatenate([image, np.zeros((self.batch - n, *image.shape[1:]), np.float32)])
        return {name: torch.from_numpy(np.asarray(v)[:n]) for name, v in zip(self.names, self.run(image))}


def int8_model(onnx_path: Path, calibration: list[torch.Tensor], batch: int, work: Path):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from chestdx.export import OnnxModel

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter(calibration)

        def get_next(self):
            x = next(self.items, None)
            return None if x is None else {"image": x.numpy()}

    prepared, quantized = work / "prepared.onnx", work / "int8.onnx"
    with contextlib.chdir(work):  # it leaves temporary model files in the working directory
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)  # "same" padding: dynamic
    quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return OnnxModel(quantized, batch=batch)  # the batch fixed as `chestdx predict` runs the fp32 export


def openvino_model(onnx_path: Path, precision: str, batch: int) -> FixedBatch:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    model.reshape({"image": [batch, *_sample_shape(onnx_path)]})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                 "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)
    names = [o.get_any_name() for o in outputs]

    def run(image):
        result = request.infer({"image": image})
        return [result[o] for o in outputs]

    return FixedBatch(run, names, batch)


def _sample_shape(onnx_path: Path) -> list[int]:
    """(C, H, W) of the export's input, from its metadata (the batch axis is dynamic)."""
    import json

    meta = json.loads(onnx_path.with_suffix(".json").read_text())
    return [int(s) for s in meta["input"]["shape"][1:]]


def pass_ms(model, batches: list[torch.Tensor], n: int) -> float:
    """One ensemble pass per image (no TTA), in ms: the least of REPEATS timings over all batches."""
    model(batches[0])  # warm
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        for b in batches:
            model(b)
        best = min(best, time.perf_counter() - started)
    return 1000 * best / n


def scored(predictor, model, batches: list[torch.Tensor]) -> np.ndarray:
    """The covid probability as `chestdx predict` gives it (TTA, temperature), with `model` doing the passes."""
    shipped = predictor.model
    predictor.model = model
    try:
        return np.concatenate([predictor.predict_tensor(b)[predictor.primary.name] for b in batches])
    finally:
        predictor.model = shipped


def compare(p: np.ndarray, reference: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score

    change = np.abs(p - reference)
    return {"auc": float(roc_auc_score(y, p)), "mean_probability_change": float(change.mean()),
            "max_probability_change": float(change.max()),
            "decisions_flipped": int(((p >= threshold) != (reference >= threshold)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "runs" / "external" / "default" / "model.pt")
    parser.add_argument("--calibration-images", type=int, default=160)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "precision.json")
    args = parser.parse_args()

    from chestdx.data.datasets import get_dataset
    from chestdx.errors import ChestDxError
    from chestdx.export import current_export, export_onnx
    from chestdx.inference import BATCH_SIZE, _FileInputs, predictor_for
    from chestdx.utils import write_json_atomic

    if not args.model.is_file():
        raise SystemExit(f"{args.model}: no model; `python benchmarks/external.py --only ladnn --variants default`")
    onnx_path = Path(current_export(args.model) or export_onnx(args.model)).resolve()
    predictor = predictor_for(args.model, "onnx", batch=BATCH_SIZE)
    manifest = get_dataset("covid-ct").manifest()

    def inputs(split: str, limit: int | None = None, seed: int = 0):
        m = manifest.subset(split)
        index = np.arange(len(m))
        if limit is not None and len(m) > limit:
            index = np.sort(np.random.default_rng(seed).choice(len(m), size=limit, replace=False))
        paths, labels = [m.paths()[i] for i in index], m.frame[m.label_column].astype(str).to_numpy()[index]
        files = _FileInputs(paths, predictor, refuse_unfamiliar=False)
        items = [files[i] for i in range(len(files))]
        bad = [error for _, x, error, _ in items if x is None]
        if bad:
            raise ChestDxError(f"{len(bad)} unreadable images, first: {bad[0]}")
        return [x for _, x, _, _ in items], np.array([label == "covid" for label in labels])

    test, y = inputs("test")
    batches = [torch.cat(test[k:k + BATCH_SIZE]) for k in range(0, len(test), BATCH_SIZE)]
    reference = scored(predictor, predictor.model, batches)
    result = {"model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
              "test_images": len(test), "batch_size": BATCH_SIZE, "threshold": predictor.threshold,
              "torch_threads": torch.get_num_threads(),
              "fp32_onnxruntime": {"pass_ms_per_image": pass_ms(predictor.model, batches, len(test)),
                                   **compare(reference, reference, y, predictor.threshold)},
              "variants": {}}
    calibration, _ = inputs("train", args.calibration_images)
    with tempfile.TemporaryDirectory() as work:
        builders = {"onnxruntime_int8_qdq": lambda: int8_model(onnx_path, calibration, BATCH_SIZE, Path(work)),
                    "openvino_fp32": lambda: openvino_model(onnx_path, "f32", BATCH_SIZE),
                    "openvino_bf16": lambda: openvino_model(onnx_path, "bf16", BATCH_SIZE)}
        for name, build in builders.items():
            try:
                model = build()
            except ImportError as err:
                result["variants"][name] = {"skipped": f"{err.name or err} not installed"}
                continue
            ms = pass_ms(model, batches, len(test))
            result["variants"][name] = {"pass_ms_per_image": ms,
                                        "speedup": result["fp32_onnxruntime"]["pass_ms_per_image"] / ms,
                                        **compare(scored(predictor, model, batches), reference, y,
                                                  predictor.threshold)}
            print(name, result["variants"][name], flush=True)
    write_json_atomic(args.out, result)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
