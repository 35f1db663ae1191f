"""Chaos (issue 24), case 8: two promotions at once from two clients against team mode's
tracking server (scripts/stack.sh: MLflow on PostgreSQL), one candidate better than the other;
on one host, and from two client hosts across the multi-host layout (tests/teamhosts.py: the
server host's stack over TLS, the bundle's exports on host ``client`` and on host ``c2``).

A champion (v1, 30 dB) is registered first. Two client processes then register a candidate
each at the same time (31.0 and 31.5 dB: both beat the champion, one beats the other) and
stop (failpoint ``client.registered``). The test lets the first one promote and holds it
inside the promotion's lock (``promote.locked``: the registry's lease taken, nothing read
yet), lets the second one go until it finds the lease held (``promote.lease_busy``), then
releases both: the two promotions overlap by construction, whichever order. Both orders are
run (the better candidate first, and last). Then, exactly: both versions READY, the champion
the better one, the lease released, and the two reports agree (the second compared against
what the first decided; each version's ``rlfn.promotion.*`` tags say what its report says).

Across hosts the weights are uploaded through the server host's nginx (MLflow's proxied
artifacts) and each client's lease and alias calls cross the bridge; the order is the same,
held the same way (the failpoints' marker folders in each client host's home).

Marked ``chaos`` only: a stack of its own (about a minute to start) and the hosts' (two more)
for seconds of promotions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from faults import armed_env, release, wait_reached
from prereq import ROOT
from teamhosts import Team, team_on_hosts
from teamstack import stack_up, why

pytestmark = pytest.mark.chaos

PSNR = "mean_psnr_y"

# One client: register the weights with a PSNR figure, stop at ``client.registered`` when armed,
# promote; each step's result as a JSON line.
CLIENT = r'''
import json, sys
import mlflow
from pipeline.mlflow_registry import log_and_register, promote
from rlfn import failpoints

name, psnr, weights = sys.argv[1], float(sys.argv[2]), sys.argv[3]
mlflow.set_experiment("chaos-promotion")
with mlflow.start_run():
    mv = log_and_register(weights, 4, registered_name=name, figures={"mean_psnr_y": psnr})
print(json.dumps({"registered": int(mv.version)}), flush=True)
failpoints.hit("client.registered")
print(json.dumps({"decision": promote(name, int(mv.version))}), flush=True)
'''

REGISTRY = r'''
import json, sys
from mlflow import MlflowClient
c = MlflowClient()
rm = c.get_registered_model(sys.argv[1])
print(json.dumps({
    "aliases": dict(rm.aliases or {}), "tags": dict(rm.tags or {}),
    "versions": {int(v.version): {"status": str(v.status), "tags": dict(v.tags or {})}
                 for v in c.search_model_versions(f"name = '{sys.argv[1]}'")}}))
'''


@pytest.fixture(scope="module")
def stack():
    with stack_up("rlfn-chaos-promo-") as st:
        yield st


@pytest.fixture(scope="module")
def team():
    # no worker joined: host c2 is a second client (the bundle's exports, nothing more)
    with team_on_hosts(("c2",)) as t:
        yield t


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    import torch

    from rlfn.models import build_model
    from rlfn.weights import save_model

    torch.manual_seed(0)
    return save_model(build_model("rlfn_ntire", 4),
                      tmp_path_factory.mktemp("w") / "rlfn_ntire_x4.safetensors")


def _env(stack, **extra) -> dict:
    return stack.client_env(PYTHONPATH=str(ROOT), **extra)


def _lines(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if line.startswith("{"):
            out.update(json.loads(line))
    return out


def _registry(stack, name: str) -> dict:
    r = subprocess.run([sys.executable, "-c", REGISTRY, name], capture_output=True, text=True,
                       env=_env(stack), cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    got["versions"] = {int(k): v for k, v in got["versions"].items()}
    return got


# how a test starts one client: (who, its PSNR, the failpoints' env) -> the process (stdout
# with stderr); and where that client's failpoint markers go
Start = Callable[[str, float, dict], subprocess.Popen]


def _two_at_once(name: str, first: str, start: Start, fp: dict[str, Path],
                 registry: Callable[[], dict]) -> None:
    """Case 8's steps and assertions (module docstring); ``start`` runs a client, ``fp[who]``
    its marker folder, ``registry()`` reads the registered model ``name``."""
    psnr = {"worse": 31.0, "better": 31.5}
    seed = start("seed", 30.0, {})
    out, _ = seed.communicate(timeout=300)
    assert seed.returncode == 0, out[-3000:]
    assert _lines(out)["decision"]["promoted"] is True
    assert registry()["aliases"] == {"champion": "1"}

    order = [first, "worse" if first == "better" else "better"]
    points = {order[0]: ("client.registered", "promote.locked"),
              order[1]: ("client.registered", "promote.lease_busy")}
    procs = {who: start(who, psnr[who], armed_env(fp[who], *points[who]))
             for who in order}  # both register at once
    try:
        for who in order:
            wait_reached(fp[who], "client.registered", procs[who], limit_s=600, what=who)
        release(fp[order[0]], "client.registered")
        wait_reached(fp[order[0]], "promote.locked", procs[order[0]], limit_s=300)
        mid = registry()  # the first holds the lease; nothing has moved
        assert sorted(mid["versions"]) == [1, 2, 3], mid["versions"]
        assert mid["aliases"] == {"champion": "1"}, mid["aliases"]
        assert "rlfn.promotion.lease" in mid["tags"], mid["tags"]
        release(fp[order[1]], "client.registered")
        wait_reached(fp[order[1]], "promote.lease_busy", procs[order[1]], limit_s=300)
        release(fp[order[1]], "promote.lease_busy")  # it waits on for the lease
        release(fp[order[0]], "promote.locked")
        outs = {who: procs[who].communicate(timeout=300) for who in order}
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait(timeout=30)
    for who in order:
        assert procs[who].returncode == 0, why(who, outs[who][0][-3000:], outs[who][1])
    got = {who: _lines(outs[who][0]) for who in order}
    ver = {who: got[who]["registered"] for who in order}
    dec = {who: got[who]["decision"] for who in order}
    print(f"\nfirst {order[0]}: " + "; ".join(f"{w} v{ver[w]}: {dec[w]['reason']}"
                                            for w in order))

    after = registry()
    assert sorted(after["versions"]) == [1, 2, 3] and sorted(ver.values()) == [2, 3]
    assert all(v["status"] == "READY" for v in after["versions"].values()), after["versions"]
    assert after["aliases"] == {"champion": str(ver["better"])}  # exactly one: the better
    assert "rlfn.promotion.lease" not in after["tags"], after["tags"]  # released
    a, b = dec[order[0]], dec[order[1]]
    assert a["promoted"] is True and a["champion_version"] == 1, a
    assert b["champion_version"] == ver[order[0]], b  # re-read inside the lock: the first's
    assert b["champion_figures"] == a["candidate_figures"], (a, b)
    assert b["promoted"] is (order[1] == "better"), b
    if order[1] == "worse":
        assert "does not beat" in b["reason"], b["reason"]
    for who in order:
        tags = after["versions"][ver[who]]["tags"]
        assert tags["rlfn.promotion.decision"] == \
            ("promoted" if dec[who]["promoted"] else "rejected"), tags
        assert tags["rlfn.promotion.reason"] == dec[who]["reason"], tags
        assert tags["rlfn.promotion.compared_to"] == str(dec[who]["champion_version"]), tags
        assert dec[who]["candidate_figures"][PSNR] == psnr[who]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("first", ["better", "worse"])
def test_two_promotions_at_once(stack, weights, tmp_path, first):
    name = f"chaos-promo-{first}"

    def start(who: str, psnr: float, armed: dict) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CLIENT, name, str(psnr), str(weights)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=ROOT, env=_env(stack, **armed), start_new_session=True)

    _two_at_once(name, first, start, {w: tmp_path / f"fp-{w}" for w in ("better", "worse")},
                 lambda: _registry(stack, name))


@pytest.mark.timeout(1500)
@pytest.mark.parametrize("first", ["better", "worse"])
def test_two_promotions_at_once_from_two_client_hosts(team: Team, weights, first):
    """The first candidate's client on host ``client``, the second's on host ``c2`` (so each
    order puts the better one on a different host); the seed champion from ``client``."""
    t = team
    name = f"chaos-promo-hosts-{first}"
    order = [first, "worse" if first == "better" else "better"]
    where = {"seed": "client", order[0]: "client", order[1]: "c2"}
    host = {"client": t.cli, "c2": t.workers["c2"]}
    clone = {"client": t.cli_clone, "c2": t.tools["c2"]}
    env = {"client": t.cenv(), "c2": t.exports_on("c2")}
    local = {}
    for h in host:  # the weights on each client host, its user's
        local[h] = host[h].home / weights.name
        shutil.copy(weights, local[h])
        os.chown(local[h], host[h].uid, host[h].uid)
    fp = {}
    for who in order:  # the marker folders, each in its client host's home, its user's
        fp[who] = host[where[who]].home / f"fp-{name}-{who}"
        fp[who].mkdir()
        shutil.chown(fp[who], host[where[who]].user, host[where[who]].user)

    def start(who: str, psnr: float, armed: dict) -> subprocess.Popen:
        h = where[who]
        py = str(clone[h] / ".venv" / "bin" / "python")
        return host[h].popen([py, "-c", CLIENT, name, str(psnr), str(local[h])], cwd=clone[h],
                             **env[h], PYTHONPATH=str(clone[h]), **armed)

    def registry() -> dict:
        got = t.client_py(REGISTRY, name)
        got["versions"] = {int(k): v for k, v in got["versions"].items()}
        return got

    _two_at_once(name, first, start, fp, registry)
