"""ONNX Runtime vs eager PyTorch, batch 1, same model, same machine, one run.

The LA-DNN network (EfficientNet-Lite0 backbone, 224 px, one grey channel), exported with
`chestdx export`. Median of --repeats timed calls after --warmup calls, inputs identical.

    python benchmarks/inference_speed.py [--checkpoint runs/reproduce_ladnn/ladnn/model.pt]

Writes benchmarks/results/inference_speed.json (keys torch_ms, onnx_ms, speedup).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_ms(fn, x, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    from chestdx.export import export_onnx
    from chestdx.inference import Predictor
    from chestdx.models import LADNN
    from chestdx.models.bundle import make_bundle, save_bundle
    from chestdx.train.config import load_config
    from chestdx.utils import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "reproduce_ladnn" / "ladnn" / "model.pt")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "inference_speed.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if not checkpoint.exists():  # speed does not depend on the weights' values
            cfg = load_config(ROOT / "configs" / "ladnn_covidct.yaml")
            checkpoint = save_bundle(make_bundle(LADNN(pretrained=None).eval(), cfg), Path(tmp) / "model.pt")
        torch_model = Predictor(checkpoint).model
        onnx_model = Predictor(export_onnx(checkpoint, Path(tmp) / "model.onnx")).model
        x = torch.randn(1, 1, 224, 224)

        @torch.no_grad()
        def eager(inp):
            return torch_model(inp)

        torch_ms = median_ms(eager, x, args.warmup, args.repeats)
        onnx_ms = median_ms(onnx_model, x, args.warmup, args.repeats)
    result = {"torch_ms": round(torch_ms, 3), "onnx_ms": round(onnx_ms, 3), "speedup": round(torch_ms / onnx_ms, 2),
              "model": "ladnn / tf_efficientnet_lite0, 1x1x224x224, batch 1",
              "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
              "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()} CPU",
              "warmup": args.warmup, "repeats": args.repeats, "statistic": "median"}
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
