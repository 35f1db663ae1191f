"""The team's bundle (issue 23): one owner-only file a server host writes
(``stack.sh bundle FILE``) and other hosts use (``stack.sh env --bundle FILE``; ``join FILE``
and ``join FILE``): the client exports with their URLs and credentials, the CA certificate,
the DVC remote's client key and its pinned host key, the team's git repository
(``RLFN_GIT_URL``, over the same sshd with the same key). It holds secrets: 0600, never in git,
handed over like a password.

Format: JSON, ``{"rlfn_stack_bundle": 1, "host", "exports": {...}, "ca_cert": PEM,
"ssh": {"remote": URL, "key": PEM, "known_hosts": line}, "git": {"url": URL}}``; in ``exports``
the CA file's path is ``{CA}``, replaced by where the client keeps it; ``GIT_SSH_COMMAND`` is
not in it: each client makes its own (an ssh config in its directory, ``sshd.ssh_config``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rlfn.io import atomic_write
from stack.core import CA_CERT, CLIENT_KEY, KNOWN_HOSTS, Ctx, StackError, write_private

VERSION = 1
CA_MARK = "{CA}"


def write(ctx: Ctx, exports: dict[str, str], path: Path) -> str:
    """``stack.sh bundle FILE``: the bundle of the stack ``ctx`` describes, at ``path`` (0600)."""
    from stack import sshd

    if not ctx.remote:
        raise StackError("bundle: the stack listens on 127.0.0.1 only, no other host can use "
                         "it: run `scripts/stack.sh up --host ADDR` first")
    if not CA_CERT.exists() or not CLIENT_KEY.exists():
        raise StackError(f"bundle: no CA or SSH key in the state directory ({CA_CERT.parent}, "
                         f"{CLIENT_KEY.parent}): run `scripts/stack.sh up --host {ctx.host}`")
    port = ctx.ports["sshd"]
    pinned = [line for line in KNOWN_HOSTS.read_text().splitlines()
              if line.startswith(f"[{ctx.host}]:{port} ")]
    doc = {
        "rlfn_stack_bundle": VERSION,
        "host": ctx.host,
        "exports": {k: v.replace(str(CA_CERT), CA_MARK) for k, v in exports.items()
                    if k not in ("RLFN_PROJECT_DIR", "GIT_SSH_COMMAND")},
        "ca_cert": CA_CERT.read_text(),
        "ssh": {"remote": f"{sshd.url(ctx)}{sshd.REMOTE_DIR}", "key": CLIENT_KEY.read_text(),
                "known_hosts": "\n".join(pinned) + "\n"},
        "git": {"url": sshd.git_url(ctx)},
    }
    if path.is_dir():
        raise StackError(f"bundle: {path} is a directory (give a file name)")
    write_private(path, json.dumps(doc, indent=1) + "\n")
    return f"bundle for {ctx.host} written to {path} (owner-only: it holds the team's secrets)"


def read(path: Path, where: str = "") -> dict:
    """The bundle at ``path``; StackError (one line, naming ``where``, default ``env --bundle
    FILE``) when it is missing, readable by others, or not a bundle."""
    where = where or f"env --bundle {path}"
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as e:
        raise StackError(f"{where}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise StackError(f"{where}: readable by others (mode {st.st_mode & 0o777:o}); it holds "
                         "the team's secrets: chmod 600 it")
    try:
        doc = json.loads(text)
    except ValueError:
        raise StackError(f"{where}: not a bundle (not JSON); make one with "
                         "`scripts/stack.sh bundle FILE` on the server host") from None
    if not isinstance(doc, dict) or doc.get("rlfn_stack_bundle") != VERSION:
        raise StackError(f"{where}: not a bundle of version {VERSION} (made by "
                         "`scripts/stack.sh bundle FILE`)")
    for key in ("host", "exports", "ca_cert", "ssh", "git"):
        if key not in doc:
            raise StackError(f"{where}: incomplete bundle (no {key!r}; a bundle made before "
                             "`stack.sh bundle` wrote it? make it again on the server host)")
    return doc


def client_dir(doc: dict) -> Path:
    """Where a client keeps a bundle's files: ``RLFN_STACK_CLIENT_DIR``, else
    ``~/.config/rlfn-stack/<host>``."""
    base = os.environ.get("RLFN_STACK_CLIENT_DIR")
    return Path(base) if base else Path.home() / ".config" / "rlfn-stack" / doc["host"]


def client_exports(path: Path, doc: dict | None = None) -> dict[str, str]:
    """``stack.sh env --bundle FILE``: the bundle's CA, SSH key, pinned host key and an ssh
    config for git written to the client's directory (0700, files 0600), the DVC remote's
    pinned route (``sshd.dvc_ssh_config``, included from ``~/.ssh/config``), and the exports
    with the CA's path there, ``RLFN_GIT_URL``, ``GIT_SSH_COMMAND`` and ``RLFN_DVC_REMOTE`` (the
    remote's URL through that route) among them. ``doc``: the
    bundle already read (``read``)."""
    from stack import sshd

    doc = doc if doc is not None else read(path)
    d = client_dir(doc)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    ca = d / "ca.crt"
    write_private(ca, doc["ca_cert"])
    write_private(d / "id_ed25519", doc["ssh"]["key"])
    write_private(d / "known_hosts", doc["ssh"]["known_hosts"])
    write_private(d / "ssh_config", sshd.ssh_config(doc["host"], d / "id_ed25519",
                                                    d / "known_hosts"))
    write_private(d / "dvc_ssh_config", sshd.dvc_ssh_config(doc["ssh"]["remote"],
                                                            d / "ssh_config", d / "id_ed25519"))
    include_in_ssh_config(d / "dvc_ssh_config")
    out = {k: v.replace(CA_MARK, str(ca)) for k, v in doc["exports"].items()}
    out["RLFN_GIT_URL"] = doc["git"]["url"]
    out["GIT_SSH_COMMAND"] = sshd.git_ssh_command(d / "ssh_config")
    out["RLFN_DVC_REMOTE"] = sshd.pinned_remote(doc["ssh"]["remote"])
    return out


INCLUDE_MARK = "# scripts/stack (rlfn-pipeline): the DVC remote of a team's stack, host key pinned"


def include_in_ssh_config(block: Path) -> None:
    """``Include`` ``block`` at the top of ``~/.ssh/config`` (made 0600 in a 0700 ``~/.ssh``
    when missing; added once, the rest of the file kept byte for byte). DVC has no setting for
    its SSH client's host keys or proxy; asyncssh reads this file (and its ``Include``s) by
    default, so this is where the pinned route of ``sshd.dvc_ssh_config`` reaches it. At the top,
    because the first value of an option wins; the block names only the alias host
    ``rlfn-stack-ADDR``, so no other ssh connection changes."""
    ssh = Path.home() / ".ssh"
    config = ssh / "config"
    line = f'Include "{block}"'
    try:
        ssh.mkdir(mode=0o700, exist_ok=True)
        text = config.read_text() if config.exists() else ""
        if line in text.splitlines():
            return
        mode = config.stat().st_mode & 0o777 if config.exists() else 0o600
        atomic_write(config, f"{INCLUDE_MARK}\n{line}\n" + (f"\n{text}" if text else ""),
                     mode=mode)
    except OSError as e:
        raise StackError(f"cannot add the DVC remote's pinned route to {config}: "
                         f"{e.strerror or e}") from None
