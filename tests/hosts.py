"""Test hosts: Linux network namespaces joined by a bridge the test makes, each "host" an address
on it and a Unix user of its own with its own home (0700), what team mode across hosts is tested
on (issue 23). Used by test_hosts.py (the harness itself), test_stack_hosts.py and teamhosts.py.

Layout of one ``hosts(...)`` (``<s>``: a random per-run suffix, so runs never collide):

* a *switch* namespace ``rlfn-sw-<s>`` holding the bridge ``br<s>`` (nothing is added to the root
  namespace: no interface, route or firewall rule of the machine is touched);
* per host ``NAME``: a namespace ``rlfn-NAME-<s>`` with ``lo`` and ``eth0`` (a veth whose other
  end is on the bridge), address ``10.231.<n>.<i>/24`` (``<n>`` random per run) and no route
  beyond that subnet: it reaches the other hosts over the bridge and nothing else;
* per host a Unix user ``rlfn-NAME-<s>`` (useradd; a login shell: sshd runs commands with it), home
  ``/tmp/rlfn-hosts-<s>/NAME`` (0700, its own).

``Host.run`` runs a command "on" a host: ``ip netns exec NS runuser -u USER -- env -i ...``, a
clean environment (HOME, USER, PATH, LANG, the test session's leak-check marker and what the
caller passes), in the host's home. Teardown kills every process of the hosts' users and of
their namespaces (by pid), deletes the namespaces, the users and the homes; ``leftovers``
names anything that survived. Where namespaces cannot be made (not root, no ``ip``, no
``useradd``, a kernel without netns) the fixture skips with the reason; under ``CI=true`` it
fails (prereq.unavailable)."""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from prereq import unavailable

SUBNET_PREFIX = "10.231"  # an unusual private range; the third octet is random per run
BASE_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
PASS_THROUGH = ("RLFN_TEST_SESSION", "CI")  # kept in a host's environment (the leak check)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@dataclass
class Host:
    """One host: its namespace, address, Unix user and home."""

    name: str
    ns: str
    addr: str
    user: str
    home: Path
    hostname: str | None = None  # its own hostname (a UTS namespace per command); None: shared
    port: str = ""  # its veth's other end, on the bridge (in the switch namespace)
    # what popen() started: teardown kills each one's process group first (a command still
    # between `ip netns exec` and runuser is in neither the namespace nor the user's uid yet)
    started: list[subprocess.Popen] = field(default_factory=list)

    @property
    def uid(self) -> int:
        return pwd.getpwnam(self.user).pw_uid

    def env(self, **extra: str) -> dict[str, str]:
        """The clean environment a command on this host gets."""
        env = {"HOME": str(self.home), "USER": self.user, "LOGNAME": self.user,
               "PATH": BASE_PATH, "LANG": "C.UTF-8"}
        env.update({k: os.environ[k] for k in PASS_THROUGH if k in os.environ})
        env.update(extra)
        return env

    def argv(self, cmd: list[str], cwd: Path | str | None = None, **env: str) -> list[str]:
        """The command line that runs ``cmd`` on this host as its user."""
        pairs = [f"{k}={v}" for k, v in self.env(**env).items()]
        uts = ([] if self.hostname is None else  # the name is set before the user's command
               ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.hostname])
        return ["ip", "netns", "exec", self.ns, *uts, "runuser", "-u", self.user, "--",
                "env", "-i", "-C", str(cwd or self.home), *pairs, *cmd]

    def run(self, cmd: list[str], timeout: float = 60, cwd: Path | str | None = None,
            input: str | None = None, **env: str) -> subprocess.CompletedProcess:
        """Run ``cmd`` on this host as its user; output captured as text."""
        return subprocess.run(self.argv(cmd, cwd, **env), capture_output=True, text=True,
                              timeout=timeout, input=input)

    def popen(self, cmd: list[str], cwd: Path | str | None = None,
              **env: str) -> subprocess.Popen:
        """Start ``cmd`` on this host as its user, in a session of its own."""
        p = subprocess.Popen(self.argv(cmd, cwd, **env), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.started.append(p)
        return p

    def root(self, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """Run ``cmd`` as root in this host's namespace (interfaces, routes)."""
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], capture_output=True,
                              text=True, timeout=timeout)


@dataclass
class Net:
    """What one ``hosts(...)`` made: the switch namespace, its bridge, the base of the homes."""

    suffix: str
    switch_ns: str
    bridge: str
    subnet: str
    base: Path
    hosts: dict[str, Host]

    def cut(self, name: str) -> None:
        """Host ``name``'s cable pulled: its port on the bridge down. The host keeps its address
        and route, and what it sends is dropped (a connect times out, nothing is refused), as
        when a link or a switch port fails; ``mend`` puts it back."""
        _ip("-n", self.switch_ns, "link", "set", self.hosts[name].port, "down")

    def mend(self, name: str) -> None:
        """Host ``name``'s port on the bridge up again (after ``cut``)."""
        _ip("-n", self.switch_ns, "link", "set", self.hosts[name].port, "up")

    def switch(self, cmd: list[str], **kw) -> subprocess.Popen:
        """Start ``cmd`` as root in the switch namespace (e.g. tcpdump on the bridge)."""
        return subprocess.Popen(["ip", "netns", "exec", self.switch_ns, *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, **kw)


def _await_line(stream, needle: str, timeout: float) -> str:
    """Read ``stream`` (a pipe) until a line holding ``needle``; what was read. ``TimeoutError``
    after ``timeout`` s or at end of stream without it."""
    import selectors

    sel, seen, buf = selectors.DefaultSelector(), [], ""
    sel.register(stream, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
                continue
            chunk = os.read(stream.fileno(), 4096).decode(errors="replace")
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split("\n")
            seen += lines
            if any(needle in line for line in lines):
                return "\n".join(seen)
    finally:
        sel.close()
    raise TimeoutError(f"no line with {needle!r} within {timeout:.0f} s: {(seen + [buf])[-5:]}")


SEND_UDP = r"""
import socket, sys
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(sys.argv[3].encode(),
                                                        (sys.argv[1], int(sys.argv[2])))
"""
END_PORT = 9  # discard: the capture's closing datagram


def send_udp(src: Host, dst: Host, port: int, payload: str) -> None:
    """One UDP datagram from ``src`` to ``dst`` (nothing needs to listen): a packet on the
    bridge whose content the test knows."""
    r = src.run(["/usr/bin/python3", "-c", SEND_UDP, dst.addr, str(port), payload])
    assert r.returncode == 0, r.stdout + r.stderr


@contextlib.contextmanager
def capture(net: "Net", pcap: Path, timeout: float = 60) -> Iterator[Path]:
    """tcpdump on the bridge: every packet between the hosts, whole (``-s 0``), written to
    ``pcap`` as it comes (``--immediate-mode -U``). Won by construction, no clock: the block
    starts once tcpdump says it listens; when it ends, one host sends another a closing
    datagram with a token of its own, and the capture stops only once the token is in the
    file (packets are written in order: every packet before it is there)."""
    src, dst = list(net.hosts.values())[:2]
    p = subprocess.Popen(["ip", "netns", "exec", net.switch_ns, "tcpdump", "--immediate-mode",
                          "-U", "-n", "-s", "0", "-i", net.bridge, "-w", str(pcap)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        _await_line(p.stderr, "listening on", timeout)
        yield pcap
        token = f"rlfn-capture-end-{secrets.token_hex(8)}".encode()
        send_udp(src, dst, END_PORT, token.decode())
        deadline = time.monotonic() + timeout
        while not _tail_has(pcap, token):
            assert time.monotonic() < deadline, f"tcpdump wrote no closing datagram to {pcap}"
            time.sleep(0.1)
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stderr.close()


def _tail_has(path: Path, token: bytes, tail: int = 1 << 16) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - tail))
        return token in f.read()


def secrets_seen(pcap: Path, secrets_: dict[str, str]) -> list[str]:
    """The names of the ``secrets_`` whose text, or its base64 (HTTP Basic carries
    ``user:password`` so), is anywhere in the captured bytes."""
    import base64

    data = pcap.read_bytes()
    found = []
    for name, value in secrets_.items():
        raw = value.encode()
        forms = {raw, base64.b64encode(raw), base64.b64encode(raw).rstrip(b"=")}
        if any(f and f in data for f in forms):
            found.append(name)
    return found


def prerequisites() -> None:
    """Namespaces and users can be made here, or ``unavailable`` with the reason."""
    if os.geteuid() != 0:
        unavailable("test hosts need root (network namespaces, per-host Unix users)")
    for tool in ("ip", "useradd", "userdel", "runuser"):
        if shutil.which(tool) is None:
            unavailable(f"test hosts need the command {tool!r}")
    probe = f"rlfn-probe-{secrets.token_hex(3)}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        unavailable(f"test hosts: cannot make a network namespace ({r.stderr.strip()})")
    _ip("netns", "del", probe, check=False)


def _procs_of(uids: set[int], namespaces: set[str]) -> set[int]:
    """Live processes run by one of ``uids`` or inside one of ``namespaces``."""
    found: set[int] = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if d.stat().st_uid in uids:
                    found.add(int(d.name))
            except OSError:
                pass
    for ns in namespaces:
        r = _ip("netns", "pids", ns, check=False)
        found |= {int(p) for p in r.stdout.split() if p.isdigit()}
    found.discard(os.getpid())
    return found


def _kill(pids: set[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, sig)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            for p in pids:  # reap our own children
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(p, os.WNOHANG)
            time.sleep(0.1)


def leftovers(net: Net, uids: set[int]) -> list[str]:
    """What of ``net`` is still there (empty after a clean teardown)."""
    left = []
    names = {n for n in _ip("netns", "list").stdout.split() if n.startswith("rlfn-")}
    for ns in [net.switch_ns, *(h.ns for h in net.hosts.values())]:
        if ns in names:
            left.append(f"namespace {ns}")
    for h in net.hosts.values():
        with contextlib.suppress(KeyError):
            pwd.getpwnam(h.user)
            left.append(f"user {h.user}")
    if net.base.exists():
        left.append(f"directory {net.base}")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError):
                stat = (d / "stat").read_text()
                if d.stat().st_uid in uids and stat[stat.rindex(")") + 2] != "Z":
                    left.append(f"process {d.name} (uid {d.stat().st_uid}): "
                                f"{(d / 'cmdline').read_bytes()[:80]!r}")
    if _ip("link", "show", net.bridge, check=False).returncode == 0:
        left.append(f"bridge {net.bridge} in the root namespace")
    return left


def teardown(net: Net) -> list[str]:
    """Kill the hosts' processes, delete namespaces, users, homes; what is left (see
    ``leftovers``), empty when all is gone."""
    uids = set()
    for h in net.hosts.values():
        with contextlib.suppress(KeyError):
            uids.add(h.uid)
    nss = {net.switch_ns, *(h.ns for h in net.hosts.values())}
    for h in net.hosts.values():
        for p in h.started:
            if p.poll() is None:  # its leader not yet reaped: the group id is still its own
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
    for _ in range(5):  # again while one turns up (a command that had not yet switched user)
        pids = _procs_of(uids, nss)
        if not pids:
            break
        _kill(pids)
    plant = os.environ.get("RLFN_HOSTS_PLANT", "")
    for ns in nss:
        if plant != "keep-namespace":
            _ip("netns", "del", ns, check=False)
    for h in net.hosts.values():
        subprocess.run(["userdel", h.user], capture_output=True, timeout=30)
    shutil.rmtree(net.base, ignore_errors=True)
    return leftovers(net, uids)


@contextlib.contextmanager
def hosts(*names: str, hostnames: bool = False) -> Iterator[Net]:
    """Hosts ``names`` on one bridge (see the module's docstring); all of it gone on exit, and
    an AssertionError naming anything that was not. ``hostnames``: each host's commands see
    its name as the hostname (network namespaces alone share the machine's), each command in
    a UTS namespace of its own made by ``unshare --uts`` (as root, before ``runuser``)."""
    prerequisites()
    sfx = secrets.token_hex(2)
    n = random.Random(secrets.randbits(32)).randint(1, 254)
    subnet = f"{SUBNET_PREFIX}.{n}"
    base = Path(f"/tmp/rlfn-hosts-{sfx}")
    net = Net(sfx, f"rlfn-sw-{sfx}", f"br{sfx}", f"{subnet}.0/24", base, {})
    plant = os.environ.get("RLFN_HOSTS_PLANT", "")
    left: list[str] = []
    try:
        base.mkdir(mode=0o711)
        os.chmod(base, 0o711)
        _ip("netns", "add", net.switch_ns)
        _ip("-n", net.switch_ns, "link", "add", net.bridge, "type", "bridge")
        _ip("-n", net.switch_ns, "link", "set", net.bridge, "up")
        for i, name in enumerate(names, start=2):
            h = Host(name, f"rlfn-{name}-{sfx}", f"{subnet}.{i}", f"rlfn-{name}-{sfx}",
                     base / name, name if hostnames else None, port=f"v{i}{sfx}")
            net.hosts[name] = h
            _ip("netns", "add", h.ns)
            _ip("-n", net.switch_ns, "link", "add", h.port, "type", "veth", "peer", "name",
                "eth0", "netns", h.ns)
            _ip("-n", net.switch_ns, "link", "set", h.port, "master", net.bridge, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            subprocess.run(["useradd", "--no-create-home", "--home-dir", str(h.home),
                            "--shell", "/bin/bash", "--user-group", h.user],
                           check=True, capture_output=True, timeout=30)
            h.home.mkdir()
            os.chown(h.home, h.uid, pwd.getpwnam(h.user).pw_gid)
            os.chmod(h.home, 0o755 if plant == "open-home" else 0o700)
        yield net
    finally:
        left = teardown(net)
    assert not left, f"test hosts survived their teardown: {left}"


_SITE_MOUNTS: dict[Path, Path] = {}


def _traversable(path: Path) -> bool:
    """Whether a user other than the owner can reach ``path``: every folder above it o+x."""
    return all(os.stat(p).st_mode & 0o001 for p in path.parents)


def _readable_site(site: Path) -> Path:
    """``site`` where the hosts' users can read it. A clone in a folder only its owner can enter
    (a fresh clone in `mktemp -d`, or under /root) hides its ``.venv`` from them: then the
    folder is bind-mounted, read-only, at ``/tmp/rlfn-hosts-site-<token>`` (once per process;
    unmounted when it exits). Read-only, so nothing done through it can touch the project's
    environment."""
    site = site.resolve()
    if _traversable(site):
        return site
    if site not in _SITE_MOUNTS:
        import atexit

        mnt = Path(f"/tmp/rlfn-hosts-site-{secrets.token_hex(4)}")
        mnt.mkdir(mode=0o755)
        for args in (["--bind", str(site), str(mnt)],
                     ["-o", "remount,bind,ro", str(mnt)]):
            r = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
                mnt.rmdir()
                unavailable(f"test hosts: {site} is not readable by other users and cannot be "
                            f"bind-mounted where it is ({r.stderr.strip()})")
        _SITE_MOUNTS[site] = mnt
        atexit.register(_unmount_site, mnt)
    return _SITE_MOUNTS[site]


def _unmount_site(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60).returncode == 0:
        mnt.rmdir()


def make_venv(h: Host, where: Path, venv: Path) -> Path:
    """A virtual environment at ``where`` (a clone's ``.venv``: that clone's ``rlfn`` and
    ``pipeline`` are the ones it imports) for host ``h``'s user, on the system's Python, that
    sees ``venv``'s packages (this machine's project environment; its own interpreter may be in
    a home no other user can enter, as pyenv's under /root), and its console scripts (dvc,
    mlflow, prefect, uvicorn) as its own: what a host's ``scripts/setup.sh`` would have made, without a
    second download. Returns its python."""
    import sys

    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(where)], check=True,
                   capture_output=True, timeout=120)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = _readable_site(venv / "lib" / ver / "site-packages")
    # the project's packages come from the host's own clone (the folder holding ``where``),
    # found on sys.path before the project environment's editable finder (which names the
    # machine's checkout, a folder the host's user may not enter and, if it can, other code)
    (where / "lib" / ver / "site-packages" / "_rlfn_host.pth").write_text(
        f"{where.resolve().parent}\nimport site; site.addsitedir({str(site)!r})\n")
    old = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info < (3, 11, 3))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    if old == "True":  # redis (Prefect's docket) imports async_timeout before 3.11.3
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(where / "lib" / ver / "site-packages"), "async-timeout"],
                       check=True, capture_output=True, timeout=300)
    py = where / "bin" / "python"
    for script in ("dvc", "mlflow", "prefect", "uvicorn"):  # uvicorn: `mlflow models serve`
        src = venv / "bin" / script
        if src.exists():
            body = src.read_text().split("\n", 1)[1]
            (where / "bin" / script).write_text(f"#!{py}\n{body}")
            os.chmod(where / "bin" / script, 0o755)
    subprocess.run(["chown", "-R", f"{h.user}:{h.user}", str(where)], check=True, timeout=60)
    return py


def install_project(h: Host, root: Path) -> Path:
    """The project as host ``h`` has it: a git clone of ``root`` in its home, the working
    tree's current files (tracked and untracked, not ignored) over it, and its own ``.venv``
    (``make_venv``); owned by the host's user. Returns the clone."""
    clone = h.home / "rlfn-pipeline"
    subprocess.run(["git", "clone", "-q", "--local", str(root), str(clone)], check=True,
                   timeout=120)
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True, timeout=60).stdout.split(b"\0")
    for f in filter(None, files):
        src, dst = root / f.decode(), clone / f.decode()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    make_venv(h, clone / ".venv", root / ".venv")
    subprocess.run(["chown", "-R", f"{h.user}:{h.user}", str(clone)], check=True, timeout=60)
    return clone


def assert_homes_private(net: Net) -> None:
    """Each host's user reads its own home, and no host's user can read another's."""
    for a in net.hosts.values():
        own = a.run(["ls", "-a", str(a.home)])
        assert own.returncode == 0, f"{a.user} cannot read its own home: {own.stderr}"
        for b in net.hosts.values():
            if b is a:
                continue
            r = a.run(["ls", str(b.home)])
            assert r.returncode != 0 and "Permission denied" in r.stderr, \
                f"{a.user} (host {a.name}) can read {b.name}'s home {b.home}: {r.stdout}{r.stderr}"
