"""Benchmark: what MLflow's basic-auth app costs per request, with MLflow's default (every
request checks the password's hash: ``auth_cache_ttl_seconds = 0``) and with the team stack's
setting (``scripts/stack/mlflow_server.py``: ``AUTH_CACHE_TTL_S``), measured in the same run.

    .venv/bin/python bench/mlflow_auth.py [--requests 200]

For each setting, a real ``mlflow server --app-name basic-auth`` (one worker, SQLite stores in
a temporary folder, 127.0.0.1, a port reserved as the tests reserve theirs) answers
``--requests`` authenticated ``GET /api/2.0/mlflow/experiments/search`` requests, one at a
time from this process; reported: the wall time per request and the server's CPU time per
request (its process tree, from /proc, before and after the requests), and the ratios. The
server's CPU is what a stage's requests take from the training beside them on a small
machine. Prints the table and writes ``bench/results/mlflow_auth.json``."""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

from servers import free_port  # noqa: E402  (tests/servers.py: a reserved loopback port)
from stack.mlflow_server import AUTH_CACHE_TTL_S  # noqa: E402

from rlfn.machine import cpu_model  # noqa: E402

USER, PASSWORD = "admin", "bench-password-0123456789"


def _tree_cpu_s(pid: int) -> float:
    """user + system CPU seconds of ``pid`` and every process under it."""
    tck = os.sysconf("SC_CLK_TCK")
    kids: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            f = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        p = int(stat.parent.name)
        stats[p] = f
        kids.setdefault(int(f[1]), []).append(p)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        if p in stats:
            total += (int(stats[p][11]) + int(stats[p][12])) / tck
        todo += kids.get(p, [])
    return total


def _get(url: str) -> int:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()
        return r.status


def measure(ttl: int, n: int, tmp: Path) -> dict:
    d = tmp / f"ttl{ttl}"
    d.mkdir()
    ini = d / "basic_auth.ini"
    ini.write_text("[mlflow]\ndefault_permission = READ\n"
                   f"database_uri = sqlite:///{d / 'auth.db'}\nadmin_username = {USER}\n"
                   "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                   f"auth_cache_ttl_seconds = {ttl}\n")
    port = free_port()
    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=str(ini),
               MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY="bench")
    log = open(d / "server.log", "w")
    srv = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
                            "--port", str(port), "--backend-store-uri",
                            f"sqlite:///{d / 'mlflow.db'}", "--app-name", "basic-auth",
                            "--workers", "1"], cwd=d, env=env, stdout=log,
                           stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                _get(url)
                break
            except Exception:
                if srv.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mlflow server (ttl {ttl}) did not start: "
                                     f"{(d / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        for _ in range(5):  # warm: imports, first queries, the cache's first fill
            _get(url)
        cpu0, t0 = _tree_cpu_s(srv.pid), time.perf_counter()
        for i in range(n):
            assert _get(url) == 200
            if (i + 1) % 50 == 0:
                print(f"  ttl {ttl}: {i + 1}/{n} requests", flush=True)
        wall, cpu = time.perf_counter() - t0, _tree_cpu_s(srv.pid) - cpu0
    finally:
        os.killpg(srv.pid, 15)
        srv.wait(timeout=60)
        log.close()
    return {"auth_cache_ttl_seconds": ttl, "requests": n, "wall_ms_per_request": 1000 * wall / n,
            "server_cpu_ms_per_request": 1000 * cpu / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mlflow_auth.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlfn-bench-auth-") as tmp:
        rows = [measure(ttl, a.requests, Path(tmp)) for ttl in (0, AUTH_CACHE_TTL_S)]
    base, ours = rows
    result = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "command": f"python bench/mlflow_auth.py --requests {a.requests}",
              "baseline (MLflow's default)": base, "ours (the stack's)": ours,
              "wall_speedup": base["wall_ms_per_request"] / ours["wall_ms_per_request"],
              "server_cpu_ratio": base["server_cpu_ms_per_request"] /
              max(ours["server_cpu_ms_per_request"], 1e-9)}
    print(f"\n{cpu_model()}, {os.cpu_count()} cores; {a.requests} authenticated GETs each")
    print("| setting | wall ms/request | server CPU ms/request |\n| --- | --- | --- |")
    for name, r in (("MLflow's default (ttl 0)", base),
                    (f"the stack's (ttl {AUTH_CACHE_TTL_S})", ours)):
        print(f"| {name} | {r['wall_ms_per_request']:.1f} | "
              f"{r['server_cpu_ms_per_request']:.1f} |")
    print(f"wall {result['wall_speedup']:.2f}x faster, server CPU "
          f"{result['server_cpu_ratio']:.2f}x less")
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
