"""The DVC remote ``stack``: a private sshd (key only) on ``HOST`` (off loopback also on the
stack's address; its host key pinned in ``known_hosts``), and this clone's default DVC remote
over it (``.dvc/config.local``). Off loopback it also serves the team's git repository of the
project (``git/rlfn-pipeline.git``, bare, seeded once with the project's branches):
``RLFN_GIT_URL``, reached with ``GIT_SSH_COMMAND`` (``ssh -F <ssh config>``: the stack's key
and pinned host key for the stack's address only; any other host as the user's own ssh
config has it)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from rlfn.io import atomic_write
from stack.core import (CLIENT_KEY, HOST, KNOWN_HOSTS, SSH, STACK, VENV_BIN, Ctx, StackError,
                        base_env, log_path, rel, write_private)
from stack.procs import pid_of, require_free, run_logged, spawn, wait_until

NAME = "sshd"
REMOTE_DIR = STACK / "dvc-remote"
GIT_REPO = STACK / "git" / "rlfn-pipeline.git"
GIT_SSH_CONFIG = SSH / "git_ssh_config"
HOST_KEY = SSH / "ssh_host_ed25519_key"


def _user() -> str:
    """The OS user the remote logs in as: ours."""
    import getpass

    return getpass.getuser()


def url(ctx: Ctx) -> str:
    """Where the sshd listens, for our user."""
    return f"ssh://{_user()}@{ctx.host}:{ctx.ports[NAME]}"


def row(ctx: Ctx) -> str:
    """``status``'s text for it."""
    git = f"; git: {git_url(ctx)}" if ctx.remote else ""
    return f"{url(ctx)} (DVC remote 'stack': {REMOTE_DIR}{git})"


def git_url(ctx: Ctx) -> str:
    """``RLFN_GIT_URL``: the team's git repository, over the stack's sshd."""
    return f"{url(ctx)}{GIT_REPO}"


def ssh_config(host: str, key: Path, known_hosts: Path) -> str:
    """An ssh config for ``GIT_SSH_COMMAND="ssh -F FILE"``: for ``host`` the stack's key only
    and its pinned host key (strict); every other host as the user's own ssh config (and the
    system's) has it, so a shell with the exports still reaches other git servers."""
    return ("# scripts/stack: git over SSH to the team's stack (RLFN_GIT_URL)\n"
            f"Host {host}\n"
            f'  IdentityFile "{key}"\n  IdentitiesOnly yes\n  IdentityAgent none\n'
            f'  UserKnownHostsFile "{known_hosts}"\n  GlobalKnownHostsFile /dev/null\n'
            "  StrictHostKeyChecking yes\n  BatchMode yes\n"
            "Match all\n  Include ~/.ssh/config /etc/ssh/ssh_config\n")


ALIAS = "rlfn-stack-{host}"


def pinned_remote(remote: str) -> str:
    """The DVC remote URL a client of another host uses: ``remote`` (the bundle's, ``ssh://USER@
    ADDR:PORT/PATH``) with its host replaced by the alias ``rlfn-stack-ADDR``, which only the
    client's ssh config (``dvc_ssh_config``) resolves. DVC's SSH client (asyncssh via sshfs)
    checks no host key, whatever its config says; behind the alias it connects through an
    OpenSSH tunnel that does. Without that config the alias resolves nowhere: no unverified
    path."""
    u = urlsplit(remote)
    return urlunsplit(u._replace(netloc=f"{u.username}@{ALIAS.format(host=u.hostname)}:"
                                        f"{u.port}"))


def dvc_ssh_config(remote: str, git_config: Path, key: Path) -> str:
    """An ssh config block (for ``~/.ssh/config``'s ``Include``, which asyncssh reads too) for
    the alias of ``pinned_remote``: a ``ProxyCommand`` that opens OpenSSH's ``-W`` tunnel to the
    stack's sshd with ``git_config`` (the stack's key and its pinned host key, strict), the
    stack's key for the login inside it. The stack's sshd lets that key forward to itself
    only (``start``: ``PermitOpen``)."""
    u = urlsplit(remote)
    host, port, user = u.hostname, u.port, u.username
    ssh = f"ssh -F {shlex.quote(str(git_config))} -p {port} -W {host}:{port} {user}@{host}"
    # asyncssh takes whatever a proxy writes to its stderr for the SSH stream, and ends the
    # connection when that pipe closes: nothing may write to it, and the shell keeps it open
    # (no exec). OpenSSH's own words ("Host key verification failed.", the changed-key
    # warning) go to DVC's stderr (the proxy's parent's, where it can be opened; else, as for
    # a pipe another user made, to ``ssh_errors.log`` beside the config), not lost behind
    # DVC's "Connection lost"
    log = shlex.quote(str(git_config.with_name("ssh_errors.log")))
    script = (f'e=/proc/$PPID/fd/2; {{ true 2>>"$e"; }} 2>/dev/null || e={log}; '
              f'{ssh} 2>>"$e"')
    proxy = f"sh -c {shlex.quote(script)}"
    return ("# scripts/stack: the DVC remote of the team's stack at "
            f"{host}:{port}, through an OpenSSH tunnel that checks its pinned host key\n"
            f"Host {ALIAS.format(host=host)}\n  ProxyCommand {proxy}\n"
            f'  IdentityFile "{key}"\n  IdentitiesOnly yes\n')


def git_ssh_command(config: Path) -> str:
    """``GIT_SSH_COMMAND`` with the ssh config ``config`` (see ``ssh_config``)."""
    return f"ssh -F {shlex.quote(str(config))}"


def exports(ctx: Ctx) -> dict[str, str]:
    """Off loopback: the team's git repository and what git needs to reach it; and DVC's
    ``DVC_EXP_AUTO_PUSH``/``DVC_EXP_GIT_REMOTE``: each ``dvc exp run`` pushes its experiment
    (``refs/exps/...``, the ref its registered versions name: ``rlfn lineage``) to that
    repository, and its data to the default remote, when it ends."""
    if not ctx.remote:
        return {}
    return {"RLFN_GIT_URL": git_url(ctx), "GIT_SSH_COMMAND": git_ssh_command(GIT_SSH_CONFIG),
            "DVC_EXP_AUTO_PUSH": "true", "DVC_EXP_GIT_REMOTE": git_url(ctx)}


def _bin() -> str:
    """sshd's path; as root on Debian, installed when missing."""
    for cand in (shutil.which("sshd"), "/usr/sbin/sshd"):
        if cand and os.access(cand, os.X_OK):
            return cand
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "openssh-server"]
        r = run_logged(NAME, install, env=env, timeout=600)
        if r.returncode != 0:  # a stale package list: update once, then again
            run_logged(NAME, ["apt-get", "update", "-q"], env=env, timeout=600)
            r = run_logged(NAME, install, env=env, timeout=600)
        if r.returncode == 0 and os.access("/usr/sbin/sshd", os.X_OK):
            return "/usr/sbin/sshd"
    raise StackError(f"sshd: not installed and `apt-get install openssh-server` failed (needs "
                     f"root and Debian's packages); read {rel(log_path(NAME))}")


def _secure_path(p: Path) -> bool:
    """sshd's StrictModes check of ``p``'s directories: each owned by root or us, not group- or
    world-writable."""
    for d in p.parents:
        st = d.stat()
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            return False
    return True


def _answers(ctx: Ctx) -> bool:
    """Whether the client key logs in."""
    cmd = ["ssh", "-F", "/dev/null", "-i", str(CLIENT_KEY), "-p", str(ctx.ports[NAME]),
           "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
           "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={KNOWN_HOSTS}",
           "-o", "GlobalKnownHostsFile=/dev/null", "-o", "ConnectTimeout=5",
           f"{_user()}@{ctx.host}", "true"]
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=15).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def health(ctx: Ctx) -> str | None:
    """``status``: None when it runs and lets the client key in."""
    if pid_of(NAME) is None:
        return "not running"
    return None if _answers(ctx) else "does not let the client key in"


def start(ctx: Ctx) -> str:
    """``up``: keys, the DVC remote, then the sshd when it is not up."""
    port = ctx.ports[NAME]
    where = url(ctx)
    exe = _bin()
    SSH.mkdir(exist_ok=True)
    os.chmod(SSH, 0o700)
    REMOTE_DIR.mkdir(exist_ok=True)
    for key, comment in ((HOST_KEY, "rlfn-stack-host"), (CLIENT_KEY, "rlfn-stack-client")):
        if not key.exists():
            r = run_logged(NAME, ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                                  "-f", str(key)])
            if r.returncode != 0:
                raise StackError(f"sshd: ssh-keygen failed; read {rel(log_path(NAME))}")
    pub = CLIENT_KEY.with_suffix(".pub").read_text().strip()
    # off loopback the key may open one tunnel: to this sshd itself (a client's pinned route
    # for DVC, ``dvc_ssh_config``); nothing else
    self_only = f"{ctx.host}:{port}"
    opts = f'restrict,port-forwarding,permitopen="{self_only}"' if ctx.remote else "restrict"
    write_private(SSH / "authorized_keys", f"{opts} {pub}\n")
    host_pub = " ".join(HOST_KEY.with_suffix(".pub").read_text().split()[:2])
    hosts = (HOST, ctx.host) if ctx.remote else (HOST,)
    atomic_write(KNOWN_HOSTS, "".join(f"[{h}]:{port} {host_pub}\n" for h in hosts))
    dvc_msg = _dvc_remote(ctx)
    if ctx.remote:
        write_private(GIT_SSH_CONFIG, ssh_config(ctx.host, CLIENT_KEY, KNOWN_HOSTS))
        dvc_msg += f"; {_git_repo(ctx)}"
    if pid_of(NAME) is not None and _answers(ctx):
        return f"already up at {where}; {dvc_msg}"
    for h in hosts:
        require_free(ctx, NAME, host=h)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # Debian's privilege separation dir
    strict = "yes" if _secure_path(SSH / "authorized_keys") else "no"
    conf = SSH / "sshd_config"
    atomic_write(
        conf,
        "# scripts/stack/sshd.py: the DVC remote's private sshd (key only, loopback)\n"
        f"Port {port}\n" + "".join(f"ListenAddress {h}\n" for h in hosts) +
        f'HostKey "{HOST_KEY}"\nAuthorizedKeysFile "{SSH / "authorized_keys"}"\n'
        "PidFile none\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitEmptyPasswords no\nHostbasedAuthentication no\nGSSAPIAuthentication no\n"
        "UsePAM no\nPermitRootLogin prohibit-password\n"
        f"AllowUsers {_user()}\n"
        f"# StrictModes: yes unless a directory above the keys is group/world writable (/tmp)\n"
        f"StrictModes {strict}\n"
        + (f"AllowTcpForwarding local\nPermitOpen {self_only}\n" if ctx.remote
           else "AllowTcpForwarding no\n") +
        "AllowAgentForwarding no\nX11Forwarding no\nPermitTunnel no\n"
        "PrintMotd no\nSubsystem sftp internal-sftp\n")
    r = run_logged(NAME, [exe, "-t", "-f", str(conf)])
    if r.returncode != 0:
        raise StackError(f"sshd: its config {rel(conf)} is rejected (sshd -t); read "
                         f"{rel(log_path(NAME))}")
    p = spawn(NAME, [exe, "-D", "-e", "-f", str(conf)], base_env(), STACK)
    wait_until(NAME, lambda: _answers(ctx), p, f"{where} (key login)")
    return f"started at {where}; {dvc_msg}"


def _dvc_remote(ctx: Ctx) -> str:
    """This clone's default DVC remote ``stack`` (``.dvc/config.local``)."""
    import importlib.util

    if importlib.util.find_spec("dvc_ssh") is None:
        raise StackError("sshd: the DVC remote over SSH needs the dvc-ssh plugin, missing from "
                         f"{VENV_BIN.parent}: pip install dvc-ssh")
    project = Path(ctx.project_dir)
    if not (project / ".dvc").is_dir():
        return f"no DVC repo at {project}: remote not set"
    remote = f"{url(ctx)}{REMOTE_DIR}"
    cfg = project / ".dvc" / "config.local"
    text = cfg.read_text() if cfg.exists() else ""
    if f"url = {remote}" in text and f"keyfile = {CLIENT_KEY}" in text and "remote = stack" in text:
        return f"dvc remote 'stack' set ({rel(cfg)})"
    dvc = str(VENV_BIN / "dvc") if (VENV_BIN / "dvc").exists() else "dvc"
    for cmd in ([dvc, "remote", "add", "--local", "-d", "-f", "stack", remote],
                [dvc, "remote", "modify", "--local", "stack", "keyfile", str(CLIENT_KEY)]):
        r = run_logged(NAME, cmd, env=base_env(), cwd=project, timeout=120)
        if r.returncode != 0:
            raise StackError(f"sshd: `{' '.join(cmd[1:3])}` for remote 'stack' failed in "
                             f"{project}; read {rel(log_path(NAME))}")
    return f"dvc remote 'stack' set as default ({rel(cfg)})"


def _git(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """A git command, its output in the service's log."""
    return run_logged(NAME, ["git", *args], env={**base_env(), "GIT_TERMINAL_PROMPT": "0"},
                      cwd=cwd, timeout=300)


def _git_repo(ctx: Ctx) -> str:
    """The team's bare git repository (``GIT_REPO``), made when missing (in a temporary
    directory, then renamed: never half made) and seeded, while it has no branch, with the
    project's branches, its HEAD the project's current branch (a detached checkout's commit
    as ``main``)."""
    made = False
    if not (GIT_REPO / "HEAD").exists():
        GIT_REPO.parent.mkdir(exist_ok=True)
        tmp = GIT_REPO.with_name(GIT_REPO.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if _git(["init", "-q", "--bare", str(tmp)]).returncode != 0:
            raise StackError(f"sshd: git init --bare {rel(tmp)} failed; read "
                             f"{rel(log_path(NAME))}")
        tmp.rename(GIT_REPO)
        made = True
    refs = subprocess.run(["git", "for-each-ref", "--count=1", "refs/heads/"], cwd=GIT_REPO,
                          capture_output=True, text=True, timeout=60).stdout.strip()
    project = Path(ctx.project_dir)
    seeded = ""
    if not refs and (project / ".git").exists():
        head = subprocess.run(["git", "symbolic-ref", "-q", "HEAD"], cwd=project,
                              capture_output=True, text=True, timeout=60).stdout.strip()
        branches = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/heads/"],
                                  cwd=project, capture_output=True, text=True,
                                  timeout=60).stdout.split()
        # a detached checkout (what a CI job checks out) seeds `main` with its HEAD: the
        # commit this host runs is the one the team's clones get
        specs = [f"{b}:{b}" for b in branches if head or b != "refs/heads/main"]
        if not head:
            specs.append("HEAD:refs/heads/main")
            head = "refs/heads/main"
        if _git(["push", "-q", str(GIT_REPO), *specs], cwd=project).returncode != 0:
            raise StackError(f"sshd: seeding the git repository {rel(GIT_REPO)} from {project} "
                             f"failed; read {rel(log_path(NAME))}")
        _git(["symbolic-ref", "HEAD", head], cwd=GIT_REPO)
        seeded = f", seeded from {project}"
    return f"git repository {'made' if made else 'kept'} at {git_url(ctx)}{seeded}"
