"""Benchmark: the served endpoint under load (issue 25 item 3), the model alone timed in the
same run as the baseline.

    .venv/bin/python bench/serving_load.py [--instances 1 2] [--clients 1 2 4 8]
        [--requests 40] [--seconds 300] [--images DIR] [--max-images 20] [--big-side 2040]

What runs is the stack's own serving path (``scripts/stack/serve.py``): its nginx config and
route, and ``launch``'s ``mlflow models serve`` instances (their environment: threads per
instance, ``RLFN_STACK_SERVE_THREADS``), with the official RLFN x4 weights
(``../shared/pretrained/rlfn_x4.pth``) registered in a temporary SQLite registry; the stack's
state directory is a temporary one (``RLFN_STACK_DIR``), its ports reserved below the kernel's
ephemeral range (``tests/servers.free_port``), all on 127.0.0.1.

For each instance count and each client count, locust (headless, ``bench/serving_locust.py``)
runs that many closed-loop clients sending real LR images (``--images``, default the DIV2K test
LR in ``../shared``: 26 sizes around 510x340, portrait and landscape), each client starting at
its own offset in the list, until ``--requests`` requests in all or ``--seconds``: latency
p50/p95/p99 (end to end on the client), throughput, errors, and the peak memory of each server
(the RSS of its whole process tree, sampled every 0.2 s from /proc, and the largest VmHWM of its
processes). The baseline: ``upscale_array`` in this process on the same images, with the thread
count of a single instance. Then one 2K LR image (``--big-side``: the first image, upscaled
bicubically to that width; 0 skips it) through the endpoint: each server's peak memory for it
(the served model tiles inputs over ``rlfn.upscale.AUTO_TILE_PIXELS`` LR pixels).

Needs locust (``.venv/bin/python -m pip install locust``; not among the project's extras).
Writes ``bench/results/serving_load.json`` and prints the table. Client and servers share the
machine's cores: figures are for this host, stated with it."""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TMP = Path(tempfile.mkdtemp(prefix="rlfn-bench-load-"))
os.chmod(TMP, 0o711)  # as root nginx's workers run as nobody: they pass through to serve/tmp
os.environ["RLFN_STACK_DIR"] = str(TMP / "stack")  # before the stack's modules are imported
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's port reservation, reused

from machine import machine  # noqa: E402 - bench/machine.py
from rlfn.threads import set_wait_policy_default  # noqa: E402

set_wait_policy_default()  # as the servers (serve.instance_env): before torch loads

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.mlflow_registry import log_and_register  # noqa: E402
from rlfn.io import decode_image  # noqa: E402
from rlfn.upscale import auto_tile, upscale_array  # noqa: E402
from rlfn.weights import load_model, save_model  # noqa: E402
from servers import free_port  # noqa: E402
from stack import core, nginx, procs  # noqa: E402
from stack import serve as stack_serve  # noqa: E402

NAME = "rlfn-x4"
LOCUSTFILE = ROOT / "bench" / "serving_locust.py"


# --------------------------------------------------------------------------- memory
def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def server_trees(n: int) -> list[set[int]]:
    """The live processes of each instance of slot 0 (``mlflow models serve`` and its
    children)."""
    trees = []
    for i in range(n):
        pid = procs.pid_of(f"{stack_serve.NAME}-0-{i}")
        trees.append(procs._tree(pid) if pid else set())
    return trees


def tree_rss_mb(tree: set[int]) -> float:
    return sum(_status_kb(p).get("VmRSS", 0) for p in tree) / 1024


def tree_hwm_mb(tree: set[int]) -> float:
    """The largest peak RSS (VmHWM) of one process of the tree: the model's process."""
    return max((_status_kb(p).get("VmHWM", 0) for p in tree), default=0) / 1024


class MemorySampler(threading.Thread):
    """Each server's tree RSS every ``every`` s; ``peak`` per server (MB)."""

    def __init__(self, trees: list[set[int]], every: float = 0.2):
        super().__init__(daemon=True)
        self.trees, self.every = trees, every
        self.peak = [tree_rss_mb(t) for t in trees]
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            for i, t in enumerate(self.trees):
                self.peak[i] = max(self.peak[i], tree_rss_mb(t))

    def finish(self) -> list[float]:
        self.stop.set()
        self.join()
        return [round(p, 1) for p in self.peak]


# --------------------------------------------------------------------------- figures
def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(np.ceil(q / 100 * len(v))) - 1))]


def latency(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_s": round(pct(values, 50), 3),
            "p95_s": round(pct(values, 95), 3), "p99_s": round(pct(values, 99), 3),
            "mean_s": round(statistics.fmean(values), 3)}


# --------------------------------------------------------------------------- the endpoint
class Endpoint:
    """The stack's serve machinery on a temporary state directory: nginx and N instances of
    one registered version, read from the bench's own registry."""

    def __init__(self, tracking_uri: str, version: str):
        self.version = version
        self.tracking = {"MLFLOW_TRACKING_URI": tracking_uri}
        self.max_instances = 8
        port = free_port(1 + 2 * self.max_instances)  # serve's port + its two slots
        self.ctx = core.Ctx({stack_serve.NAME: port},
                            {stack_serve.NAME: core.Port("RLFN_STACK_SERVE_PORT", port)},
                            str(ROOT), None)
        for d in (core.RUN, core.LOGS):
            d.mkdir(parents=True, exist_ok=True)
        self.exe = nginx.nginx_bin(stack_serve.NAME, "the served endpoint")
        self.url = stack_serve.url(self.ctx)
        self.n = 0

    def start(self, n: int) -> None:
        self.stop()
        os.environ["RLFN_STACK_SERVE_INSTANCES"] = str(n)
        launched = stack_serve.launch(self.ctx, NAME, self.version, tracking=self.tracking)
        nginx.prepare_dir(stack_serve.DIR)
        stack_serve.CONF.write_text(stack_serve._conf(self.ctx))
        stack_serve._write_route(self.ctx, self.exe, stack_serve._route(
            self.ctx, NAME, self.version, launched.ports))
        stack_serve.spawn_nginx(self.ctx, self.exe)
        self.n = n

    def stop(self) -> None:
        stack_serve.stop(stack_serve.NAME)
        self.n = 0

    def logs(self) -> list[Path]:
        return sorted(core.LOGS.glob(f"{stack_serve.NAME}-*.log"))


def post(url: str, body: bytes, timeout: float = 900) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{url}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def png_body(png: bytes) -> bytes:
    import base64

    return json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(png).decode("ascii")]]}}).encode()


def run_locust(url: str, images: list[Path], clients: int, requests: int, seconds: int,
               out: Path) -> list[dict]:
    """One headless locust run; its requests (one dict each)."""
    env = dict(os.environ, RLFN_LOAD_IMAGES=json.dumps([str(p) for p in images]),
               RLFN_LOAD_OUT=str(out), RLFN_LOAD_REQUESTS=str(requests))
    log = out.with_suffix(".log")
    cmd = [str(Path(sys.executable).parent / "locust"), "-f", str(LOCUSTFILE), "--headless",
           "--host", url, "-u", str(clients), "-r", str(clients), "--run-time", f"{seconds}s",
           "--stop-timeout", "900", "--only-summary", "--exit-code-on-error", "0"]
    with open(log, "wb") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                           timeout=seconds + 1200)
    if r.returncode != 0:
        raise SystemExit(f"locust exited {r.returncode}; read {log}:\n"
                         + log.read_text(errors="replace")[-2000:])
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared"))
    ap.add_argument("--images", default=None,
                    help="folder of LR PNGs (default: shared/data/div2k_test_lr_x4)")
    ap.add_argument("--max-images", type=int, default=20,
                    help="the first N images of the folder, sorted (default 20)")
    ap.add_argument("--weights", default=None,
                    help="official weights (default: shared/pretrained/rlfn_x4.pth)")
    ap.add_argument("--instances", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=40,
                    help="requests in all per (instances, clients) run (default 40)")
    ap.add_argument("--seconds", type=int, default=300,
                    help="time bound of each run, s (default 300)")
    ap.add_argument("--big-side", type=int, default=2040,
                    help="width of the 2K LR image sent once per instance count (0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serving_load.json"))
    args = ap.parse_args()
    if not (Path(sys.executable).parent / "locust").exists():
        raise SystemExit("bench/serving_load.py needs locust in this venv (not in the project's "
                         "extras): .venv/bin/python -m pip install locust")
    shared = Path(args.shared)
    folder = Path(args.images or shared / "data" / "div2k_test_lr_x4")
    images = sorted(folder.glob("*.png"))[:args.max_images]
    if not images:
        raise SystemExit(f"no PNG in {folder}")
    pth = Path(args.weights or shared / "pretrained" / "rlfn_x4.pth")
    lrs = [decode_image(p.read_bytes(), name=str(p))[0] for p in images]
    sizes = sorted({f"{a.shape[1]}x{a.shape[0]}" for a in lrs})
    print(f"{len(images)} LR images from {folder} ({len(sizes)} sizes: {', '.join(sizes[:6])}"
          f"{' ...' if len(sizes) > 6 else ''}); host: {os.cpu_count()} CPUs")

    try:
        uri = f"sqlite:///{TMP}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        loaded = load_model(pth, scale=4)
        weights = save_model(loaded.model, TMP / f"{pth.stem}.safetensors",
                             provenance={"source": str(pth)})
        exp = mlflow.create_experiment("bench-serving-load",
                                       artifact_location=(TMP / "art").as_uri())
        with mlflow.start_run(experiment_id=exp):
            mv = log_and_register(weights, 4)

        # the baseline: the model alone, in this process, as many threads as one instance
        threads_1 = stack_serve.threads(1)
        torch.set_num_threads(threads_1)
        model = load_model(weights).model
        upscale_array(model, lrs[0][:64, :64])  # warm-up
        alone = {}
        for p, lr in zip(images, lrs):
            t0 = time.perf_counter()
            upscale_array(model, lr, tile=auto_tile(*lr.shape[:2]))
            alone[p.name] = time.perf_counter() - t0
        baseline = latency(list(alone.values()))
        baseline.update(threads=threads_1,
                        throughput_rps=round(1 / statistics.fmean(alone.values()), 3))
        print(f"model alone ({threads_1} thread{'s' * (threads_1 != 1)}): "
              f"p50 {baseline['p50_s']:.2f} s over {len(lrs)} images")
        del model

        big_png = None
        if args.big_side:
            im = Image.fromarray(lrs[0])
            h = round(im.height * args.big_side / im.width)
            buf = io.BytesIO()
            im.resize((args.big_side, h), Image.BICUBIC).save(buf, format="PNG")
            big_png = buf.getvalue()

        ep = Endpoint(uri, str(mv.version))
        runs, big = [], []
        for n in args.instances:
            ep.start(n)
            trees = server_trees(n)
            status, raw = post(ep.url, png_body(images[0].read_bytes()))  # warm-up
            if status != 200:
                raise SystemExit(f"warm-up request: HTTP {status}: {raw[:300]!r}\n"
                                 + _log_tails(TMP))
            idle = [round(tree_rss_mb(t), 1) for t in trees]
            for c in args.clients:
                sampler = MemorySampler(trees)
                sampler.start()
                t0 = time.monotonic()
                reqs = run_locust(ep.url, images, c, args.requests, args.seconds,
                                  TMP / f"load-{n}-{c}.jsonl")
                wall = time.monotonic() - t0
                peak = sampler.finish()
                ok = [r for r in reqs if not r["problem"]]
                span = (max(r["start"] + r["s"] for r in reqs) - min(r["start"] for r in reqs)
                        if reqs else 0)
                row = {"instances": n, "clients": c, "threads_per_instance":
                       stack_serve.threads(n), "requests": len(reqs),
                       "errors": len(reqs) - len(ok),
                       "error_examples": sorted({r["problem"][:200] for r in reqs
                                                 if r["problem"]})[:3],
                       **latency([r["s"] for r in ok]),
                       "throughput_rps": round(len(ok) / span, 3) if span else 0.0,
                       "wall_s": round(wall, 1), "rss_idle_mb": idle, "rss_peak_mb": peak,
                       "hwm_mb": [round(tree_hwm_mb(t), 1) for t in trees]}
                if c == 1 and ok:  # the same images, one at a time: per image vs alone
                    row["vs_alone_per_image"] = round(statistics.median(
                        r["s"] / alone[r["image"]] for r in ok if r["image"] in alone), 3)
                runs.append(row)
                print(f"  {n} instance(s), {c} client(s): {row.get('n', 0)} ok, "
                      f"{row['errors']} errors, p50 {row.get('p50_s', float('nan')):.2f} s, "
                      f"{row['throughput_rps']:.2f} req/s")
            if big_png is not None:
                sampler = MemorySampler(trees)
                sampler.start()
                t0 = time.perf_counter()
                status, raw = post(ep.url, png_body(big_png))
                took = time.perf_counter() - t0
                peak = sampler.finish()
                w, h = Image.open(io.BytesIO(big_png)).size
                big.append({"instances": n, "lr": [w, h], "status": status,
                            "tile": auto_tile(h, w), "seconds": round(took, 2),
                            "response_bytes": len(raw), "rss_before_mb": idle,
                            "rss_peak_mb": peak,
                            "hwm_mb": [round(tree_hwm_mb(t), 1) for t in trees],
                            "rss_after_mb": [round(tree_rss_mb(t), 1) for t in trees]})
            ep.stop()
    finally:
        try:
            stack_serve.stop(stack_serve.NAME)
        finally:
            warnings = _warning_lines(TMP)
            import shutil

            shutil.rmtree(TMP, ignore_errors=True)

    one = next((r for r in runs if r["instances"] == min(args.instances) and r["clients"] == 1
                and r.get("n")), None)
    result = {
        "what": "the stack's endpoint (nginx + mlflow models serve) under load; the model "
                "alone in the same run",
        "command": "bench/serving_load.py " + " ".join(sys.argv[1:]),
        "images": {"folder": str(folder), "count": len(images), "sizes": sizes},
        "weights": str(pth), "model": loaded.name, "model_alone": baseline, "runs": runs,
        "big_input": big, "server_log_warnings": warnings,
        "one_client_p50_vs_alone": (round(one["p50_s"] / baseline["p50_s"], 3) if one
                                    else None),
        "machine": machine(torch=torch.__version__, mlflow=mlflow.__version__),
    }
    print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")
    return 0


def _log_tails(tmp: Path, n: int = 25) -> str:
    return "".join(f"--- {log.name}\n" + "\n".join(
        log.read_text(errors="replace").splitlines()[-n:]) + "\n"
        for log in sorted((tmp / "stack" / "logs").glob("*.log")))


def _warning_lines(tmp: Path) -> list[str]:
    """Lines of the model servers' logs that say warning (a good request should print none)."""
    out = []
    for log in sorted((tmp / "stack" / "logs").glob("serve-*.log")):
        out += [f"{log.name}: {line.strip()[:200]}" for line in
                log.read_text(errors="replace").splitlines() if "warning" in line.lower()]
    return out


def print_table(r: dict) -> None:
    b = r["model_alone"]
    print(f"\n{'':24}{'requests':>9}{'errors':>7}{'p50 s':>8}{'p95 s':>8}{'p99 s':>8}"
          f"{'req/s':>8}  peak RSS per server, MB")
    print(f"{'model alone, ' + str(b['threads']) + ' thr':<24}{b['n']:>9}{0:>7}"
          f"{b['p50_s']:>8.2f}{b['p95_s']:>8.2f}{b['p99_s']:>8.2f}{b['throughput_rps']:>8.2f}"
          "  (in this process)")
    for x in r["runs"]:
        label = f"{x['instances']} inst x {x['threads_per_instance']} thr, {x['clients']} cl"
        lat = (f"{x['p50_s']:>8.2f}{x['p95_s']:>8.2f}{x['p99_s']:>8.2f}" if x.get("n")
               else f"{'-':>8}{'-':>8}{'-':>8}")
        print(f"{label:<24}{x['requests']:>9}{x['errors']:>7}{lat}{x['throughput_rps']:>8.2f}"
              f"  {' / '.join(f'{m:.0f}' for m in x['rss_peak_mb'])}")
    for g in r["big_input"]:
        print(f"2K input {g['lr'][0]}x{g['lr'][1]} LR (tile {g['tile']}), {g['instances']} "
              f"inst: HTTP {g['status']}, {g['seconds']:.1f} s, peak RSS per server "
              f"{' / '.join(f'{m:.0f}' for m in g['rss_peak_mb'])} MB (before "
              f"{' / '.join(f'{m:.0f}' for m in g['rss_before_mb'])})")
    if r["one_client_p50_vs_alone"] is not None:
        print(f"1 client p50 / model alone p50: {r['one_client_p50_vs_alone']:.2f}x (goal <= 1.2)")
    print(f"warning lines in the servers' logs: {len(r['server_log_warnings'])}")
    for line in r["server_log_warnings"][:5]:
        print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
