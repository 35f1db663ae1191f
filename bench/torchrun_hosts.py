"""Benchmark (issue 23 item 7): one training stage under torchrun across two hosts vs the
same stage with two ranks on one host, in the same run. Root (network namespaces):

    sudo nice -n 19 .venv/bin/python bench/torchrun_hosts.py [--iterations 60] [--repeats 2]
                                                              [--patch 64] [--batch 4]
                                                              [--json bench/results/torchrun_hosts_cpu.json]

The hosts are those of the tests (tests/hosts.py: network namespaces on a bridge, a Unix user
and a home each; tests/multinode.py: each host its own project copy, images and config;
torchrun one rank per host, c10d on the first host's address, gloo over eth0). The one-host
run is ``rlfn train --nproc-per-node 2`` on the first host (rlfn.train.launch: gloo over its
loopback), and the same with ``torchrun --standalone --nproc-per-node 2`` (the launcher of the
two-host run: launch.py's ranks ran slower per iteration than torchrun's on this machine, with
the same weights, before any change for hosts). Runs alternate (two hosts, one host, one host
torchrun, ...) so that load from elsewhere falls on all.

Per run: it/s = iterations / the training seconds ``result.json`` records (the loop, its
checkpoints and gradient all-reduces; not the interpreters' start, the imports, the
rendezvous or the patch store), the wall time of the whole command, and the bytes each host
sent on its bridge interface (``/sys/class/net/eth0/statistics/tx_bytes`` in its namespace;
for the one-host run its loopback's). Both hosts share this machine's cores: the figure is
what the network path costs, not what a second machine would add. Prints one line per run,
the medians, their ratio and the CPU model; ``--json`` writes it all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from machine import machine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--patch", type=int, default=64, help="HR patch size (default 64)")
    ap.add_argument("--batch", type=int, default=4, help="global batch (default 4)")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()

    import pytest  # tests/prereq.py's skip: here a plain exit with the reason

    from hosts import hosts, install_project
    from multinode import (host_env, make_images, one_host_argv, result, run_hosts,
                           standalone_argv, torchrun_argv, write_config)

    import torch

    rows: list[dict] = []
    try:
        ctx = hosts("alpha", "beta", hostnames=True)
        net = ctx.__enter__()
    except pytest.skip.Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        a = net.hosts["alpha"]
        clones, cfgs = {}, {}
        for n, h in net.hosts.items():
            clones[n] = install_project(h, ROOT)
            cfgs[n] = write_config(h, make_images(h), iterations=args.iterations,
                                   checkpoint_every=10 ** 6, log_every=10 ** 6,
                                   patch_size=args.patch, batch_size=args.batch)

        def tx(h, dev: str = "eth0") -> int:
            return int(h.root(["cat", f"/sys/class/net/{dev}/statistics/tx_bytes"]).stdout)

        for k in range(args.repeats):
            run_id = f"bench-{uuid.uuid4().hex[:8]}"
            out = f"out-hosts-{k}"
            sent0 = {n: tx(h) for n, h in net.hosts.items()}
            t0 = time.perf_counter()
            runs = run_hosts([(h, torchrun_argv(h, clones[n], a, cfgs[n], h.home / out, run_id),
                               clones[n], host_env()) for n, h in net.hosts.items()])
            wall = time.perf_counter() - t0
            for rc, log in runs:
                if rc != 0:
                    print(log[-3000:], file=sys.stderr)
                    return 1
            sent = {n: tx(h) - sent0[n] for n, h in net.hosts.items()}
            r = result(a.home / out)
            rows.append({"kind": "two hosts", "it_s": r["iterations"] / r["seconds"],
                         "train_s": r["seconds"], "wall_s": wall, "bytes_sent": sent,
                         "hosts": r["hosts"]})

            out = f"out-one-{k}"
            lo0 = tx(a, "lo")
            t0 = time.perf_counter()
            [(rc, log)] = run_hosts([(a, one_host_argv(clones["alpha"], cfgs["alpha"],
                                                       a.home / out),
                                      clones["alpha"], {"OMP_NUM_THREADS": "1"})])
            wall = time.perf_counter() - t0
            if rc != 0:
                print(log[-3000:], file=sys.stderr)
                return 1
            r = result(a.home / out)
            rows.append({"kind": "one host", "it_s": r["iterations"] / r["seconds"],
                         "train_s": r["seconds"], "wall_s": wall,
                         "bytes_sent": {"alpha (lo)": tx(a, "lo") - lo0}, "hosts": r["hosts"]})
            out = f"out-standalone-{k}"
            lo0 = tx(a, "lo")
            t0 = time.perf_counter()
            [(rc, log)] = run_hosts([(a, standalone_argv(clones["alpha"], cfgs["alpha"],
                                                         a.home / out),
                                      clones["alpha"], {"OMP_NUM_THREADS": "1",
                                                        "GLOO_SOCKET_IFNAME": "lo"})])
            wall = time.perf_counter() - t0
            if rc != 0:
                print(log[-3000:], file=sys.stderr)
                return 1
            r = result(a.home / out)
            rows.append({"kind": "one host, torchrun", "it_s": r["iterations"] / r["seconds"],
                         "train_s": r["seconds"], "wall_s": wall,
                         "bytes_sent": {"alpha (lo)": tx(a, "lo") - lo0}, "hosts": r["hosts"]})
            for row in rows[-3:]:
                print(f"{row['kind']:18s}  {row['it_s']:7.2f} it/s  train {row['train_s']:6.1f} s"
                      f"  wall {row['wall_s']:6.1f} s  sent {row['bytes_sent']}", flush=True)
    finally:
        ctx.__exit__(None, None, None)

    med = {kind: statistics.median(r["it_s"] for r in rows if r["kind"] == kind)
           for kind in ("two hosts", "one host", "one host, torchrun")}
    per_it = statistics.median(sum(r["bytes_sent"].values()) / args.iterations
                               for r in rows if r["kind"] == "two hosts")
    info = machine(torch=torch.__version__)
    print(f"cpu: {info['cpu']} ({info['cores']} cores, shared by both hosts)")
    print(f"stage: {args.iterations} iterations, batch {args.batch}, patch {args.patch}, "
          f"2 ranks x 1 thread, gloo")
    print(f"two hosts (torchrun, one rank each): {med['two hosts']:.2f} it/s (median of "
          f"{args.repeats})")
    print(f"one host (two ranks):                {med['one host']:.2f} it/s")
    print(f"one host (torchrun --standalone, two ranks): {med['one host, torchrun']:.2f} it/s")
    print(f"ratio two hosts / one host:          {med['two hosts'] / med['one host']:.3f}")
    print(f"ratio two hosts / one host torchrun: "
          f"{med['two hosts'] / med['one host, torchrun']:.3f}")
    print(f"bridge bytes per iteration (both hosts' eth0 tx): {per_it:,.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": info, "iterations": args.iterations, "batch": args.batch,
            "patch": args.patch, "median_it_s": med,
            "ratio": med["two hosts"] / med["one host"],
            "ratio_vs_torchrun_one_host": med["two hosts"] / med["one host, torchrun"],
            "bridge_bytes_per_iteration": per_it,
            "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
