"""Load test of the service: 1,000 requests from 8 concurrent clients, 90% images, 10% bad files.

Starts `chestdx serve` on 127.0.0.1 with the LA-DNN checkpoint (an untrained bundle of the same
network if none exists), posts real covid-ct test images (as PNG/JPEG, and some as DICOM) and
bad files (text, empty, corrupt, truncated, DICOM without pixels), each with the web page's
default of a Grad-CAM++ heat map. Afterwards every 200 must have its row in the database.

    python benchmarks/serve_load.py [--requests 1000] [--clients 8] [--checkpoint PATH]

Writes benchmarks/results/serve_load.json (p50_ms, p95_ms, p99_ms, requests_per_s,
status_counts, lost_results).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def dicom_bytes(grey: np.ndarray) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("load.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Load^Test", "L1"
    ds.Rows, ds.Columns = grey.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if grey.size:
        ds.PixelData = grey.astype(np.uint16).tobytes()
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def payloads(n: int, bad_share: float, seed: int) -> list[tuple[str, bytes, bool]]:
    import cv2

    from chestdx.data.datasets import get_dataset

    paths = get_dataset("covid-ct").manifest().subset("test").paths()
    rng = np.random.default_rng(seed)
    good = []
    for path in rng.choice(paths, size=40, replace=False):
        data = Path(path).read_bytes()
        good.append((Path(path).name, data))
    grey = cv2.imdecode(np.frombuffer(good[0][1], np.uint8), cv2.IMREAD_GRAYSCALE)
    good.append(("slice.dcm", dicom_bytes(grey.astype(np.uint16) * 16)))
    bad = [("notes.txt", b"not an image\n"), ("empty.png", b""), ("corrupt.png", good[0][1][:300]),
           ("truncated.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 64), ("nopixels.dcm", dicom_bytes(np.zeros((0, 0))))]
    schedule = []
    for _ in range(n):
        if rng.random() < bad_share:
            name, data = bad[rng.integers(len(bad))]
            schedule.append((name, data, False))
        else:
            name, data = good[rng.integers(len(good))]
            schedule.append((name, data, True))
    return schedule


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: Path, db_url: str, home: Path, port: int) -> subprocess.Popen:
    env = dict(os.environ, CHESTDX_HOME=str(home))
    proc = subprocess.Popen([sys.executable, "-m", "chestdx.cli", "serve", "--models", str(models), "--db", db_url,
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read().decode()[-2000:]}")
    proc.kill()
    raise SystemExit("server did not start in 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "reproduce_ladnn" / "ladnn" / "model.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args()

    from chestdx.serve.db import Database
    from chestdx.utils import write_json_atomic

    schedule = payloads(args.requests, args.bad_share, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = tmp / "models"
        models.mkdir()
        if args.checkpoint.exists():
            os.symlink(args.checkpoint.resolve(), models / "ladnn.pt")
            model_note = str(args.checkpoint.relative_to(ROOT) if args.checkpoint.is_relative_to(ROOT) else args.checkpoint)
        else:
            from chestdx.models import LADNN
            from chestdx.models.bundle import make_bundle, save_bundle
            from chestdx.train.config import load_config

            save_bundle(make_bundle(LADNN(pretrained=None).eval(), load_config(ROOT / "configs" / "ladnn_covidct.yaml")),
                        models / "ladnn.pt")
            model_note = "untrained ladnn bundle (no checkpoint found)"
        db_url = f"sqlite:///{tmp / 'studies.db'}"
        port = free_port()
        server = start_server(models, db_url, tmp / "home", port)
        url = f"http://127.0.0.1:{port}/api/v1/predict"
        results: list[tuple[int, float, str | None, bool]] = []
        lock = threading.Lock()
        queue = iter(enumerate(schedule))

        def client():
            with httpx.Client(timeout=120) as http:
                while True:
                    with lock:
                        item = next(queue, None)
                    if item is None:
                        return
                    _, (name, data, valid) = item
                    start = time.perf_counter()
                    try:
                        res = http.post(url, files={"file": (name, data)}, data={"model": "ladnn"})
                        status = res.status_code
                        study = res.json().get("study_id") if status == 200 else None
                    except httpx.HTTPError:
                        status, study = 0, None  # connection failure: counted, never hidden
                    with lock:
                        results.append((status, (time.perf_counter() - start) * 1000, study, valid))

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        server.terminate()
        server.wait(timeout=30)
        stored = Database(db_url).ids()

    latencies = np.array([r[1] for r in results])
    ok_ids = [r[2] for r in results if r[0] == 200]
    statuses = Counter(str(r[0]) for r in results)
    report = {
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": round(float(np.percentile(latencies, 99)), 1),
        "requests_per_s": round(len(results) / elapsed, 2),
        "status_counts": dict(sorted(statuses.items())),
        "lost_results": sum(1 for i in ok_ids if i not in stored),
        "server_errors_5xx": sum(v for k, v in statuses.items() if k.startswith("5") or k == "0"),
        "valid_requests_answered_200": sum(1 for r in results if r[3] and r[0] == 200),
        "valid_requests": sum(1 for r in results if r[3]),
        "requests": len(results), "clients": args.clients, "bad_share": args.bad_share,
        "heatmaps": "Grad-CAM++ on every valid request (the web page's default)",
        "model": model_note, "backend": "onnxruntime (heat maps: pytorch)", "database": "SQLite (WAL)",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, server and clients on the same machine",
        "seconds": round(elapsed, 1),
    }
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    if report["lost_results"] or report["server_errors_5xx"]:
        raise SystemExit("FAILED: lost results or server errors")


if __name__ == "__main__":
    main()
