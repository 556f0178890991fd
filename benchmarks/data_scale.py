"""Peak RSS and images/s of one epoch of data loading, per cache mode, for 1k to 100k rows.

ChestX-ray14 has 112k images; keeping them all decoded in memory (~22 GB at 224 px) does
not fit a training machine, which is why `disk` and `none` exist. This measures whether
their memory stays flat as the manifest grows.

Items are distinct paths (symlinks in a temp folder) to the 746 real covid-ct images, so a
100k-row manifest costs no disk space. Each (rows, mode) runs in a fresh subprocess, so
peak RSS is that process's ru_maxrss: it builds an ArrayStore with the training load
function and iterates it once through a DataLoader (batch 64, num_workers 0).

    python benchmarks/data_scale.py [--rows 1000 10000 100000] [--size 224]

Writes benchmarks/results/data_scale.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("memory", "disk", "none")
RSS_LIMIT_MB = 6000  # the machine is shared: a measurement above this is killed
MEMORY_MODE_LIMIT_BYTES = 5 * 1024**3  # memory mode is skipped when the arrays alone exceed this
TIME_BUDGET_S = 25 * 60
RUN_TIMEOUT_S = 20 * 60


def load_image(path, size: int):
    """The training pipeline's deterministic load steps (for now: grey + INTER_AREA resize).

    Swap this for the training load steps when they move onto ArrayStore."""
    import cv2

    from chestdx.data.io import read_image

    return cv2.resize(read_image(path).to_gray(), (size, size), interpolation=cv2.INTER_AREA)


def source_images() -> list[Path]:
    from chestdx.settings import data_root

    folder = data_root() / "covid-ct" / "images"
    sources = sorted(p for p in folder.rglob("*") if p.is_file())
    if not sources:
        raise SystemExit(f"no covid-ct images under {folder} (set CHESTDX_DATA)")
    return sources


def link_path(links: Path, i: int, suffix: str) -> Path:
    return links / f"{i // 1000:03d}" / f"{i:06d}{suffix}"


def warm_page_cache(sources: list[Path]) -> None:
    """Read every source once, so no mode pays for the first read from disk."""
    for p in sources:
        p.read_bytes()


def rows_label(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def make_links(links: Path, sources: list[Path], rows: int) -> None:
    """Row i is a symlink to source i mod 746: a distinct path, real content, no copied bytes."""
    for i in range(rows):
        target = link_path(links, i, sources[i % len(sources)].suffix)
        if i % 1000 == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(sources[i % len(sources)], target)


# ---- one measurement, in its own process ------------------------------------------------

def measure(rows: int, mode: str, links: Path, size: int, cache_dir: Path) -> dict:
    """Build the store and iterate it once; peak RSS covers imports, items and the epoch."""
    import resource

    import torch
    from torch.utils.data import DataLoader, Dataset

    from chestdx.data.cache import ArrayStore

    class StoreDataset(Dataset):
        def __init__(self, store):
            self.store = store

        def __len__(self):
            return len(self.store)

        def __getitem__(self, i):
            return torch.from_numpy(self.store[i])

    sources = source_images()
    items = [link_path(links, i, sources[i % len(sources)].suffix) for i in range(rows)]
    start = time.perf_counter()
    store = ArrayStore(items, functools.partial(load_image, size=size), mode=mode, cache_dir=cache_dir,
                       settings_key=json.dumps({"size": size, "resize": "INTER_AREA", "gray": True}))
    seen = 0
    for batch in DataLoader(StoreDataset(store), batch_size=64, num_workers=0):
        seen += batch.shape[0]
    elapsed = time.perf_counter() - start
    assert seen == rows
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"rows": rows, "cache": mode, "peak_rss_mb": round(peak_kb / 1024, 1),
            "images_per_s": round(rows / elapsed, 1), "seconds": round(elapsed, 1)}


# ---- the driver ---------------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_child(rows: int, mode: str, links: Path, size: int, tmp: Path) -> dict:
    """One measurement in a fresh process, killed if it passes RSS_LIMIT_MB; cold disk cache."""
    cache_dir = tmp / f"cache-{mode}-{rows}"
    cmd = [sys.executable, __file__, "--measure", str(rows), mode, str(links), str(size), str(cache_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak, deadline = 0.0, time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None:
        peak = max(peak, rss_mb(proc.pid))
        if peak > RSS_LIMIT_MB or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            shutil.rmtree(cache_dir, ignore_errors=True)
            why = f"RSS passed {RSS_LIMIT_MB} MB" if peak > RSS_LIMIT_MB else f"ran past {RUN_TIMEOUT_S} s"
            return skipped(rows, mode, f"killed: {why}")
        time.sleep(0.2)
    out = proc.stdout.read()
    shutil.rmtree(cache_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {rows} x {mode} failed (exit {proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    print(f"  {rows:>7} rows  {mode:<6}  {result['peak_rss_mb']:>8.1f} MB  {result['images_per_s']:>7.1f} img/s"
          f"  ({result['seconds']} s)", flush=True)
    return result


def skipped(rows: int, mode: str, reason: str) -> dict:
    print(f"  {rows:>7} rows  {mode:<6}  skipped: {reason}", flush=True)
    return {"rows": rows, "cache": mode, "peak_rss_mb": None, "images_per_s": None, "skipped": reason}


def skip_notes(runs: list[dict]) -> str:
    """Skipped runs stay in "runs" with nulls; why they were skipped goes into the note."""
    return "".join(f" Skipped {r['rows']} rows x {r['cache']}: {r.pop('skipped')}." for r in runs if "skipped" in r)


def memory_mode_bytes(rows: int, size: int) -> int:
    return rows * size * size * 4


def estimate_seconds(first: dict, rows: list[int], size: int, sources: int) -> float:
    """Time of the remaining runs, from the smallest run: decodes at the `none` rate, disk hits
    at the rate left over once the 1k disk run's decodes are paid for."""
    decode_s = 1 / first["none"]["images_per_s"]
    small = first["none"]["rows"]
    misses = min(small, sources)
    hit_s = decode_s  # no hits in the smallest run: assume a hit costs a decode (an upper bound)
    if small > misses:
        hit_s = max(0.0, (small / first["disk"]["images_per_s"] - misses * decode_s) / (small - misses))
    total = 0.0
    for n in rows[1:]:
        total += n * decode_s  # none
        total += min(n, sources) * decode_s + max(0, n - sources) * hit_s  # disk, cold cache
        if memory_mode_bytes(n, size) <= MEMORY_MODE_LIMIT_BYTES:
            total += n * decode_s
    return total


def run_size(rows: list[int], size: int, links: Path, tmp: Path, sources: int) -> tuple[list[dict], float]:
    runs = [run_child(rows[0], mode, links, size, tmp) for mode in MODES]
    estimate = estimate_seconds({r["cache"]: r for r in runs}, rows, size, sources)
    print(f"estimated time of the larger runs at {size} px: {estimate / 60:.1f} min", flush=True)
    return runs, estimate


def run_all(rows: list[int], size: int, links: Path, tmp: Path, sources: int) -> tuple[list[dict], int, float]:
    runs, estimate = run_size(rows, size, links, tmp, sources)
    if estimate > TIME_BUDGET_S and size > 128:
        size = 128
        print(f"over the {TIME_BUDGET_S // 60} min budget: every run at {size} px instead", flush=True)
        runs, estimate = run_size(rows, size, links, tmp, sources)
    for n in rows[1:]:
        for mode in MODES:
            if mode == "memory" and memory_mode_bytes(n, size) > MEMORY_MODE_LIMIT_BYTES:
                gb = memory_mode_bytes(n, size) / 1e9
                runs.append(skipped(n, mode, f"holds {n}*{size}*{size}*4 bytes = {gb:.1f} GB of arrays, over the "
                                             f"{MEMORY_MODE_LIMIT_BYTES / 1024**3:.0f} GiB allowed on this shared "
                                             f"machine ({os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1024**3:.0f} GiB RAM)"))
            else:
                runs.append(run_child(n, mode, links, size, tmp))
    return runs, size, estimate


def ratios(runs: list[dict], small: int, large: int) -> dict:
    by = {(r["rows"], r["cache"]): r["peak_rss_mb"] for r in runs}
    out = {}
    for mode in MODES:
        a, b = by.get((small, mode)), by.get((large, mode))
        out[mode] = round(b / a, 3) if a and b else None
    return out


def main() -> None:
    from chestdx.utils import write_json_atomic

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_scale.json")
    args = parser.parse_args()
    rows = sorted(args.rows)

    sources = source_images()
    with tempfile.TemporaryDirectory(prefix="chestdx-data-scale-") as tmp:
        links = Path(tmp) / "links"
        make_links(links, sources, rows[-1])
        warm_page_cache(sources)
        started = time.perf_counter()
        runs, size, estimate = run_all(rows, args.size, links, Path(tmp), len(sources))
        total = time.perf_counter() - started
    for r in runs:
        r.pop("seconds", None)
    skips = skip_notes(runs)
    result = {
        "runs": runs,
        f"rss_ratio_{rows_label(rows[-1])}_over_{rows_label(rows[0])}": ratios(runs, rows[0], rows[-1]),
        "setting": {"image_size": size, "load": "read_image(p).to_gray() -> cv2.resize INTER_AREA, float32",
                    "dataloader": "batch_size 64, num_workers 0, default collate", "sources": len(sources),
                    "disk_cache": "cold: a fresh cache_dir per measurement, removed after",
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
                    "total_seconds": round(total, 1), "estimated_seconds_after_1k": round(estimate, 1)},
        "note": (f"Each row is a distinct symlink to one of the {len(sources)} covid-ct images, so the "
                 f"content-hashed disk cache holds only {len(sources)} entries however many rows there are: "
                 "that is what content hashing does with duplicated content, and beyond the first "
                 f"{len(sources)} rows every disk read is a cache hit (real datasets with distinct images would "
                 "decode once per image on the first epoch). peak_rss_mb is ru_maxrss of a fresh process and "
                 "includes the torch import; images_per_s covers building the store and one epoch." + skips),
    }
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        _, _, n, m, links_dir, px, cdir = sys.argv
        print(json.dumps(measure(int(n), m, Path(links_dir), int(px), Path(cdir))))
    else:
        main()
