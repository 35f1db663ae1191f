"""One training stage under torchrun across two hosts (issue 23 item 4, last bullet): hosts
``alpha`` and ``beta`` (tests/hosts.py: network namespaces on a bridge, a Unix user and a
private home each, each its own hostname) each hold their own copy of the project, their own
copy of the training images and their own output folder; nothing is shared but the bridge.
torchrun runs one rank on each (c10d rendezvous on alpha's address, gloo over eth0).

* The two-host run's weights are bit-identical (sha256 of ``model.safetensors``) to the same
  stage with two ranks on one host (``rlfn train --nproc-per-node 2`` on alpha), only rank 0's
  host holds the run's files, and ``result.json`` names both hosts (each rank's hostname and
  address, rlfn.train.setup.host_identity); rerun, neither host redoes anything.
* Interrupted (both hosts stopped while rank 0 waits at a failpoint after the checkpoint of
  iteration 3), the run resumes on both hosts from rank 0's checkpoint (beta has none of its
  own) and ends with the same weights.

Root and network namespaces are needed: elsewhere this skips with the reason, under ``CI=true``
it fails. Plants that make each assertion fail: docs/multihost-status.md ("torchrun")."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from faults import armed_env, wait_reached
from hosts import hosts, install_project
from prereq import ROOT
from multinode import (chown, host_env, make_images, one_host_argv, result, run_hosts,
                            sha256, stop, torchrun_argv, write_config)

pytestmark = pytest.mark.stack

RUN_S = 600  # bound on one run of the tiny stage (a few seconds of training; imports on a busy
# 2-core machine), not a check of speed


@pytest.fixture(scope="module")
def two_hosts():
    """alpha and beta, each with its own project, images and config: ``(net, clones, cfgs)``."""
    with hosts("alpha", "beta", hostnames=True) as net:
        clones, cfgs = {}, {}
        for name, h in net.hosts.items():
            clones[name] = install_project(h, ROOT)
            cfgs[name] = write_config(h, make_images(h))
        yield net, clones, cfgs


@pytest.fixture(scope="module")
def one_host(two_hosts):
    """The same stage with two ranks on alpha alone: its output folder."""
    net, clones, cfgs = two_hosts
    a = net.hosts["alpha"]
    out = a.home / "out-one-host"
    [(rc, log)] = run_hosts([(a, one_host_argv(clones["alpha"], cfgs["alpha"], out),
                              clones["alpha"], {"OMP_NUM_THREADS": "1"})], timeout=RUN_S)
    assert rc == 0, log[-3000:]
    return out


def _both(net, clones, cfgs, out_name: str, env: dict | None = None) -> list[tuple[int, str]]:
    """The stage on alpha and beta at once, one rank each, into ``~/<out_name>`` on each."""
    a = net.hosts["alpha"]
    run_id = f"rlfn-{uuid.uuid4().hex[:8]}"
    return run_hosts([(h, torchrun_argv(h, clones[n], a, cfgs[n], h.home / out_name, run_id),
                       clones[n], host_env(**(env or {}).get(n, {})))
                      for n, h in net.hosts.items()], timeout=RUN_S)


def _ok(runs: list[tuple[int, str]]) -> None:
    for (rc, log), name in zip(runs, ("alpha", "beta")):
        assert rc == 0, f"{name}: exit {rc}\n" + (log if len(log) < 8000 else
                                                   log[:3000] + "\n[...]\n" + log[-5000:])


RUN_FILES = ("model.safetensors", "result.json", "checkpoint", "curves.csv", "curves.png")


@pytest.mark.timeout(2400)  # hosts, two project copies, three runs of the tiny stage
def test_two_hosts_match_two_ranks_on_one_host(two_hosts, one_host):
    net, clones, cfgs = two_hosts
    a, b = net.hosts["alpha"], net.hosts["beta"]
    _ok(_both(net, clones, cfgs, "out"))
    out_a, out_b = a.home / "out", b.home / "out"
    # rank 0 (alpha: the rendezvous ranks the nodes by address) holds the run's files, beta
    # none (its own patch store only)
    assert all((out_a / f).exists() for f in RUN_FILES), sorted(os.listdir(out_a))
    assert not any((out_b / f).exists() for f in RUN_FILES), sorted(os.listdir(out_b))
    done, ref = result(out_a), result(one_host)
    assert (done["world_size"], done["per_rank_batch"]) == (2, 2), done
    assert (ref["world_size"], ref["per_rank_batch"]) == (2, 2), ref
    assert done["iterations"] == ref["iterations"] == 6
    # the weights: bit-identical to two ranks on one host
    assert sha256(out_a / "model.safetensors") == sha256(one_host / "model.safetensors"), \
        "two hosts trained other weights than two ranks on one host"
    # result.json names both hosts: each rank's hostname and its address on the bridge
    seen = [(h["rank"], h["hostname"], h["address"]) for h in done["hosts"]]
    assert seen == [(0, "alpha", a.addr), (1, "beta", b.addr)], json.dumps(done["hosts"])
    assert {(h["hostname"], h["address"]) for h in ref["hosts"]} == {("alpha", "127.0.0.1")}, \
        json.dumps(ref["hosts"])
    # rerun: the run is complete (rank 0's answer, on both hosts): nothing redone anywhere
    before = sha256(out_a / "model.safetensors")
    runs = _both(net, clones, cfgs, "out")
    _ok(runs)
    assert "nothing to do" in runs[0][1] and "nothing to do" in runs[1][1], runs
    assert sha256(out_a / "model.safetensors") == before
    assert not any((out_b / f).exists() for f in RUN_FILES), sorted(os.listdir(out_b))


@pytest.mark.timeout(2400)
def test_two_hosts_resume_from_rank0s_checkpoint(two_hosts, one_host):
    net, clones, cfgs = two_hosts
    a, b = net.hosts["alpha"], net.hosts["beta"]
    fp = a.home / "failpoints"
    env = {"alpha": armed_env(fp, "train.step@5")}  # rank 0 waits before step 5 (after the
    chown(a, fp)                                     # checkpoint of iteration 3)
    run_id = f"rlfn-{uuid.uuid4().hex[:8]}"
    procs = [h.popen(torchrun_argv(h, clones[n], a, cfgs[n], h.home / "out-resume", run_id),
                     cwd=clones[n], **host_env(**env.get(n, {})))
             for n, h in net.hosts.items()]
    try:
        wait_reached(fp, "train.step", procs[0], limit_s=RUN_S, what="alpha's rank 0")
    finally:
        for h, p in zip(net.hosts.values(), procs):
            stop(h, p)
    out_a, out_b = a.home / "out-resume", b.home / "out-resume"
    state = json.loads((out_a / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 3 and not (out_a / "result.json").exists(), state
    assert not (out_b / "checkpoint").exists() and not (out_b / "result.json").exists()
    _ok(_both(net, clones, cfgs, "out-resume"))
    done = result(out_a)
    assert done["resumed_from"] == 3 and done["iterations"] == 6, done
    assert sha256(out_a / "model.safetensors") == sha256(one_host / "model.safetensors"), \
        "the resumed two-host run trained other weights than two ranks on one host"
    assert [h["hostname"] for h in done["hosts"]] == ["alpha", "beta"], done["hosts"]
    assert not any((out_b / f).exists() for f in RUN_FILES), sorted(os.listdir(out_b))
