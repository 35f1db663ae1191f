"""The test hosts of tests/hosts.py (issue 23): two hosts reach each other over the bridge the
test made and nothing else, each host's user keeps its home to itself, and nothing of them is
left after teardown. Plants that make each assertion fail: RLFN_HOSTS_PLANT=open-home (homes
0755), RLFN_HOSTS_PLANT=keep-namespace (teardown leaves the namespaces), and see
docs/multihost-status.md for the others."""

from __future__ import annotations

import pwd
import subprocess
import time
from pathlib import Path

import pytest

from hosts import (_await_line, _ip, assert_homes_private, capture, hosts, secrets_seen,
                   send_udp)

pytestmark = pytest.mark.stack

PY = "/usr/bin/python3"
LISTEN = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
print("listening", flush=True)
while True:
    c, peer = s.accept(); c.sendall(f"hello {peer[0]}\n".encode()); c.close()
"""
CONNECT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as c:
        print(c.recv(100).decode().strip())
except OSError as e:
    print(f"refused: {e}"); sys.exit(1)
"""


def _listen(h, addr: str, port: int) -> subprocess.Popen:
    p = h.popen([PY, "-c", LISTEN, addr, str(port)])
    assert p.stdout.readline().strip() == "listening"
    return p


def test_hosts_reach_each_other_only_over_the_bridge():
    with hosts("alpha", "beta") as net:
        a, b = net.hosts["alpha"], net.hosts["beta"]
        for h in (a, b):  # lo and eth0, a route to the subnet and none beyond it
            links = h.root(["ip", "-o", "link", "show"]).stdout
            names = sorted(line.split(":")[1].strip().split("@")[0]
                           for line in links.splitlines())
            assert names == ["eth0", "lo"], links
            routes = h.root(["ip", "route", "show"]).stdout.strip().splitlines()
            assert len(routes) == 1 and routes[0].startswith(net.subnet), routes
            out = h.root(["ip", "route", "get", "192.0.2.1"])  # resolved locally, nothing sent
            assert out.returncode != 0 and "unreachable" in out.stderr, out.stdout + out.stderr

        cap = net.switch(["tcpdump", "-l", "-n", "-i", net.bridge, "-c", "1",
                          f"tcp and src host {a.addr} and dst host {b.addr} and dst port 24680"])
        _await_line(cap.stderr, "listening on", 30)  # the capture is open: no clock
        servers = [_listen(b, b.addr, 24680), _listen(b, "127.0.0.1", 24681)]
        try:
            r = a.run([PY, "-c", CONNECT, b.addr, "24680"])
            assert r.returncode == 0 and r.stdout.strip() == f"hello {a.addr}", \
                r.stdout + r.stderr
            seen, err = cap.communicate(timeout=10)
            assert f"{a.addr}." in seen and f"> {b.addr}.24680" in seen, seen + err
            # beta's loopback listener is beta's own: not on alpha's loopback, not on the bridge
            for target in ("127.0.0.1", b.addr):
                r = a.run([PY, "-c", CONNECT, target, "24681"])
                assert r.returncode == 1 and "refused" in r.stdout, (target, r.stdout)
        finally:
            for p in servers:
                p.kill()
                p.wait()
            if cap.poll() is None:
                cap.kill()
                cap.communicate()


def test_a_cut_host_reaches_no_one_until_mended():
    """``Net.cut``: the host's packets vanish (a connect times out; nothing answers, nothing
    refuses), the others still reach each other; after ``mend`` it is back."""
    with hosts("alpha", "beta", "gamma") as net:
        a, b, c = (net.hosts[n] for n in ("alpha", "beta", "gamma"))
        server = _listen(b, b.addr, 24683)
        try:
            assert a.run([PY, "-c", CONNECT, b.addr, "24683"]).stdout.strip() == \
                f"hello {a.addr}"
            net.cut("alpha")
            r = a.run([PY, "-c", CONNECT, b.addr, "24683"])
            assert r.returncode == 1 and "timed out" in r.stdout, r.stdout + r.stderr
            r = c.run([PY, "-c", CONNECT, b.addr, "24683"])  # the rest of the bridge works
            assert r.returncode == 0 and r.stdout.strip() == f"hello {c.addr}", r.stdout
            net.mend("alpha")
            r = a.run([PY, "-c", CONNECT, b.addr, "24683"])
            assert r.returncode == 0 and r.stdout.strip() == f"hello {a.addr}", \
                r.stdout + r.stderr
        finally:
            server.kill()
            server.wait()


def test_each_host_keeps_its_home_to_itself():
    with hosts("alpha", "beta") as net:
        a, b = net.hosts["alpha"], net.hosts["beta"]
        assert a.uid != b.uid and a.home != b.home
        assert a.run(["id", "-un"]).stdout.strip() == a.user
        env = dict(line.split("=", 1) for line in a.run(["env"]).stdout.splitlines())
        assert env["HOME"] == str(a.home) and "VIRTUAL_ENV" not in env, env
        w = a.run(["sh", "-c", "umask 077; echo secret > secret.txt"])
        assert w.returncode == 0, w.stderr
        assert_homes_private(net)
        r = b.run(["cat", str(a.home / "secret.txt")])
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stdout + r.stderr


def test_teardown_leaves_nothing():
    with hosts("alpha") as net:
        a = net.hosts["alpha"]
        lingering = a.popen(["sleep", "600"])
        uid = a.uid
        names = (net.switch_ns, a.ns, a.user, net.base)
    time.sleep(0.2)
    assert lingering.wait(timeout=10) is not None, "a process of a host outlived the teardown"
    listed = _ip("netns", "list").stdout
    assert names[0] not in listed and names[1] not in listed, listed
    with pytest.raises(KeyError):
        pwd.getpwnam(names[2])
    assert not names[3].exists()
    deadline = time.monotonic() + 10  # a killed process's zombie is reaped by its parent
    while (left := _running_as(uid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of the removed host user survived: {left}"


def _running_as(uid: int) -> list[str]:
    """Live (not zombie) processes of ``uid``."""
    found = []
    for p in Path("/proc").iterdir():
        try:
            stat = (p / "stat").read_text()
            if p.stat().st_uid == uid and stat[stat.rindex(")") + 2] != "Z":
                found.append(f"{p.name}: {stat[:60]}")
        except (OSError, ValueError):
            continue
    return found


def test_the_capture_finds_a_secret_sent_in_clear(tmp_path):
    """The check the end-to-end test makes of its capture (``hosts.secrets_seen``) finds a
    secret that did cross the bridge in clear, as itself and as HTTP Basic's base64 of
    ``user:secret``, and not one that never crossed: the capture is open before the first
    packet and flushed when it stops."""
    import base64

    with hosts("alpha", "beta") as net:
        a, b = net.hosts["alpha"], net.hosts["beta"]
        pcap = tmp_path / "bridge.pcap"
        os_pass = "s3cret-" + tmp_path.name
        basic = base64.b64encode(f"rlfn:{os_pass}-basic".encode()).decode()
        with capture(net, pcap):
            for payload in (os_pass, f"Authorization: Basic {basic}"):
                send_udp(a, b, 24682, payload)
        assert pcap.stat().st_size > 0
        assert secrets_seen(pcap, {"clear": os_pass, "basic": f"rlfn:{os_pass}-basic",
                                   "never sent": f"{os_pass}-never"}) == ["clear", "basic"]

