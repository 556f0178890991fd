"""A throwaway PostgreSQL cluster from Debian's package, on a private Unix socket, for the service
tests (tests/conftest.py) and the load benchmark (benchmarks/serve_load.py)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent  # Debian links initdb alone into /usr/local/bin
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@contextmanager
def throwaway_postgres(max_connections: int = 100):
    """Yield a SQLAlchemy URL of a fresh database; the cluster is stopped and deleted afterwards."""
    bindir = postgres_bin()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL not installed (apt-get install postgresql)")
    # Under /tmp itself: pytest's temporary folders are private to this user. initdb refuses to
    # run as root: the cluster then belongs to the postgres system user.
    root = Path(tempfile.mkdtemp(prefix="chestdx-pg-"))
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", 54329 + os.getpid() % 500

    def run(*cmd):
        done = subprocess.run([*as_user, *cmd], capture_output=True, text=True, cwd=root)
        if done.returncode:
            raise RuntimeError(f"{Path(cmd[0]).name} failed: {done.stderr.strip()[-500:]}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "chestdx", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"), "-o",
            f"-k {root} -p {port} -c listen_addresses='' -c fsync=off -c max_connections={max_connections}", "start")
        run(str(bindir / "createdb"), "-h", str(root), "-p", str(port), "-U", "chestdx", "chestdx")
        yield f"postgresql+psycopg://chestdx@/chestdx?host={root}&port={port}"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, cwd=root)
        shutil.rmtree(root, ignore_errors=True)
