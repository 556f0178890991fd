"""Load test of the service: 1,000 requests from 8 concurrent clients, 90% images, 10% bad files.

Starts two `chestdx serve` processes on two ports sharing one throwaway PostgreSQL (SQLite with
--database sqlite), with the LA-DNN checkpoint (an untrained bundle of the same network and
input size if none exists), and creates an API key. The clients alternate between the two
processes and post real covid-ct test images (PNG, and one as DICOM) and bad files (text,
empty, corrupt, truncated, DICOM without pixels, a blank image), each with the web page's
default of a Grad-CAM++ heat map; then the same schedule again without heat maps, for the ratio.
Both are timed after an untimed warm-up of `--warmup` valid requests in each mode (its answers are
still checked: no 5xx, no resets, every 200 stored).
Afterwards every 200 must have its row in the database; connection failures are counted.

    python benchmarks/serve_load.py [--requests 1000] [--clients 8] [--checkpoint PATH]

Writes benchmarks/results/serve_load.json (p50_ms, p95_ms, p99_ms, p99_ms_without_heatmap,
requests_per_s, status_counts, lost_results, connection_resets, database, ...).
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
    ds.RescaleIntercept, ds.RescaleSlope = -1350, 1  # stored values 0..1530 are HU -1350..180
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
    good.append(("slice.dcm", dicom_bytes(grey.astype(np.uint16) * 6)))
    bad = [("notes.txt", b"not an image\n"), ("empty.png", b""), ("corrupt.png", good[0][1][:300]),
           ("truncated.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 64), ("nopixels.dcm", dicom_bytes(np.zeros((0, 0)))),
           ("blank.png", cv2.imencode(".png", np.zeros((512, 512), np.uint16))[1].tobytes())]
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
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stdout.read().decode()[-2000:]}")
    proc.kill()
    raise SystemExit("server did not start in 300 s")


def run_schedule(schedule, urls: list[str], key: str, clients: int, heatmap: bool) -> tuple[list, float]:
    """(status, ms, study id, valid) per request, and the seconds it all took; client k uses urls[k % n]."""
    results: list[tuple[int, float, str | None, bool]] = []
    lock = threading.Lock()
    queue = iter(schedule)

    def client(k: int):
        with httpx.Client(timeout=120, headers={"X-API-Key": key}) as http:
            while True:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                name, data, valid = item
                start = time.perf_counter()
                try:
                    res = http.post(urls[k % len(urls)], files={"file": (name, data)},
                                    data={"model": "ladnn", "heatmap": str(heatmap).lower()})
                    status = res.status_code
                    study = res.json().get("study_id") if status == 200 else None
                except httpx.HTTPError:
                    status, study = 0, None  # a reset or refused connection: counted, never hidden
                with lock:
                    results.append((status, (time.perf_counter() - start) * 1000, study, valid))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - started


def p99(results) -> float:
    return round(float(np.percentile([r[1] for r in results], 99)), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--bad-share", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=32, help="untimed valid requests per mode first")
    parser.add_argument("--processes", type=int, default=2, help="service processes, one port each")
    parser.add_argument("--database", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "reproduce_ladnn" / "ladnn" / "model.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = parser.parse_args()

    from contextlib import nullcontext

    from chestdx.serve.auth import Accounts
    from chestdx.serve.db import Database
    from chestdx.utils import write_json_atomic

    sys.path.insert(0, str(ROOT))
    from tests.postgres import throwaway_postgres

    schedule = payloads(args.requests, args.bad_share, seed=0)
    with tempfile.TemporaryDirectory() as tmp, \
            (throwaway_postgres() if args.database == "postgresql" else nullcontext(None)) as pg_url:
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

            from chestdx.data.datasets import get_dataset
            from chestdx.data.input_check import REFERENCE_KEY, fit_manifest_reference

            bundle = make_bundle(LADNN(pretrained=None).eval(), load_config(ROOT / "configs" / "ladnn_covidct.yaml"))
            # the input check of a trained bundle: covid-ct's training images
            bundle[REFERENCE_KEY] = fit_manifest_reference(get_dataset("covid-ct").manifest(), modality="CT",
                                                           hu_window=bundle["preprocess"].get("hu_window"))
            save_bundle(bundle, models / "ladnn.pt")
            model_note = ("untrained ladnn bundle (no checkpoint found; same network and input size, input "
                          "reference of covid-ct's training images)")
        db_url = pg_url or f"sqlite:///{tmp / 'studies.db'}"
        db = Database(db_url)
        key, _ = Accounts(db).create_key("load-test", ["predict", "read"], name="serve_load")
        ports = [free_port() for _ in range(args.processes)]
        servers = [start_server(models, db_url, tmp / "home", port) for port in ports]
        urls = [f"http://127.0.0.1:{port}/api/v1/predict" for port in ports]
        try:
            # warm-up, not timed: each process's first requests allocate ONNX Runtime's buffers and fill
            # the connection pools, a cost the first timed schedule alone would otherwise carry
            warmup = [item for item in schedule if item[2]][:args.warmup]
            warm = (run_schedule(warmup, urls, key, args.clients, heatmap=True)[0]
                    + run_schedule(warmup, urls, key, args.clients, heatmap=False)[0])
            results, elapsed = run_schedule(schedule, urls, key, args.clients, heatmap=True)
            plain, _ = run_schedule(schedule, urls, key, args.clients, heatmap=False)
            card = httpx.get(urls[0].replace("/predict", "/models"), headers={"X-API-Key": key}).json()["models"][0]
        finally:
            for server in servers:
                server.terminate()
            for server in servers:
                server.wait(timeout=30)
        stored = db.ids()
        database = db.server

    latencies = np.array([r[1] for r in results])
    everything = warm + results + plain
    ok_ids = [r[2] for r in everything if r[0] == 200]
    statuses = Counter(str(r[0]) for r in results)
    report = {
        "p50_ms": round(float(np.percentile(latencies, 50)), 1),
        "p95_ms": round(float(np.percentile(latencies, 95)), 1),
        "p99_ms": p99(results),
        "p99_ms_without_heatmap": p99(plain),
        "p99_ratio_heatmap": round(p99(results) / p99(plain), 2),
        "requests_per_s": round(len(results) / elapsed, 2),
        "status_counts": dict(sorted(statuses.items())),
        "status_counts_without_heatmap": dict(sorted(Counter(str(r[0]) for r in plain).items())),
        "lost_results": sum(1 for i in ok_ids if i not in stored),
        "server_errors_5xx": sum(1 for r in everything if r[0] >= 500),
        "connection_resets": sum(1 for r in everything if r[0] == 0),
        "valid_requests_answered_200": sum(1 for r in results if r[3] and r[0] == 200),
        "valid_requests": sum(1 for r in results if r[3]),
        "requests": len(results), "clients": args.clients, "bad_share": args.bad_share,
        "warmup_requests_per_mode": len(warmup),
        "service_processes": args.processes,
        "heatmaps": f"{card.get('heatmap_method', 'gradcam++')} on every valid request (the web page's default), "
                    f"{card.get('heatmap_backend', 'pytorch')}",
        "model": model_note, "backend": card["backend"], "database": database,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, servers, database and clients on the same machine",
        "seconds": round(elapsed, 1),
    }
    write_json_atomic(args.out, report)
    print(json.dumps(report, indent=2))
    if report["lost_results"] or report["server_errors_5xx"] or report["connection_resets"]:
        raise SystemExit("FAILED: lost results, server errors or connection resets")


if __name__ == "__main__":
    main()
