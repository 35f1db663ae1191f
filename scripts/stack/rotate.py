"""``rotate NAME...``: a new value for each named secret of the stack (``secrets/stack.json``),
applied where the old one is held, then every service restarted with it (``down``, ``up``).

A secret a service keeps itself is changed there first, through that service, with the old
value: the PostgreSQL roles' passwords (``ALTER ROLE`` as the superuser), the MLflow admin's
(its ``users/update-password`` API). The others are read only when a service starts, so the
restart applies them. Each new value is written to ``secrets/rotating.json`` (owner-only)
before it is applied and to the secrets once it is, so a crash in between leaves it on disk,
never lost; a secret whose change fails is left as it was (the error names it and why), those
rotated before it stay rotated. Keys and certificates ``up`` makes (``MADE``: the SSH client
key pair, sshd's host key, off loopback the TLS CA and server certificate) are rotated by
removing them before the restart, which makes new ones. ``all``: every rotatable one. Not rotatable:
``mlflow_webhook_key`` (the key MLflow encrypts stored webhook secrets with: a new one makes
them unreadable). After a rotation the old credentials are refused everywhere: every other
host needs the new bundle (``bundle FILE``, then ``join FILE`` or ``env --bundle FILE``)."""

from __future__ import annotations

import json
import secrets

from stack import mlflow_server, postgresql, sshd, tls
from stack.core import (CA_CERT, CLIENT_KEY, SECRETS, Ctx, StackError, load_secrets, rel,
                        save_secrets, say, write_private)

PENDING = SECRETS.parent / "rotating.json"

# A secret a running service holds: that service (it must be up to rotate it) and how to
# change the secret there (with the context's old values).
HELD = {
    "pg_superuser_password": ("postgresql", lambda ctx, new: postgresql.set_password(
        ctx, postgresql.PG_SUPERUSER, new)),
    "db_password": ("postgresql", lambda ctx, new: postgresql.set_password(
        ctx, postgresql.DB_ROLE, new)),
    "mlflow_admin_password": ("mlflow", mlflow_server.set_admin_password),
}
FIXED = {"mlflow_webhook_key": "the key MLflow encrypts the stored webhook secrets with (a new "
                               "one makes them unreadable)"}
# Keys and certificates ``up`` makes when they are missing: rotated by removing them, so that
# the restart makes new ones (what each is, its files, whether only off loopback).
MADE = {
    "ssh_key": ("the client key pair of the DVC remote and git, in every bundle",
                (CLIENT_KEY, CLIENT_KEY.with_suffix(".pub")), False),
    "ssh_host_key": ("sshd's host key, pinned by every client",
                     (sshd.HOST_KEY, sshd.HOST_KEY.with_suffix(".pub")), False),
    "tls": ("the CA and the server certificate, which every client verifies",
            (tls.CA_KEY, CA_CERT, tls.SERVER_KEY, tls.SERVER_CERT), True),
}


def rotatable(wanted: dict[str, int], remote: bool = False) -> list[str]:
    """What ``rotate`` changes (``wanted``: the secrets, name -> bytes), in table order, then
    the keys and certificates (``tls`` only off loopback: ``remote``)."""
    return ([k for k in wanted if k not in FIXED] +
            [k for k, (_, _, off) in MADE.items() if remote or not off])


def names_of(args: list[str], wanted: dict[str, int], remote: bool = False) -> list[str]:
    """The secrets ``args`` name (``all``: every rotatable one); StackError for an unknown or
    fixed one, naming what can be rotated."""
    can = rotatable(wanted, remote)
    if not args:
        raise StackError(f"rotate: name the secrets to rotate, or all ({', '.join(can)})")
    if args == ["all"]:
        return can
    for a in args:
        if a in FIXED:
            raise StackError(f"rotate: {a} is not rotatable: {FIXED[a]}")
        if a in MADE and a not in can:
            raise StackError(f"rotate: {a}: the stack listens on 127.0.0.1 only and has no "
                             f"{a.upper()} (`up --host ADDR` makes it)")
        if a not in wanted and a not in MADE:
            raise StackError(f"rotate: no secret {a!r} in the stack (rotatable: "
                             f"{', '.join(can)}, or all)")
    return list(dict.fromkeys(args))


def rotate(names: list[str], wanted: dict[str, int], context, health) -> list[str]:
    """Rotate ``names`` (``context(sec)`` makes a Ctx; ``health(name, ctx)`` says whether the
    service holding a secret is up: None when it is); the names rotated. StackError naming the
    secret (and what was rotated before it) on the first failure."""
    sec = load_secrets()
    if PENDING.exists():
        raise StackError(f"rotate: {rel(PENDING)} holds a value from an interrupted rotation; "
                         f"compare it with {rel(SECRETS)}, keep the one its service accepts, "
                         "delete the file, then rotate again")
    for held in sorted({HELD[n][0] for n in names if n in HELD}):
        problem = health(held, context(sec))
        if problem is not None:
            raise StackError(f"rotate: {held} is not up ({problem}): `scripts/stack.sh up` "
                             "first (a secret it holds is changed through it)")
    done: list[str] = []
    for name in names:
        if name in MADE:
            continue
        new = secrets.token_urlsafe(wanted[name])
        write_private(PENDING, json.dumps({name: new}) + "\n")
        try:
            if name in HELD:
                HELD[name][1](context(sec), new)
        except StackError as e:
            PENDING.unlink(missing_ok=True)
            before = f" (rotated before it: {', '.join(done)})" if done else ""
            raise StackError(f"rotate: {name}: {e}; it keeps its old value{before}") from None
        sec[name] = new
        save_secrets(sec)
        PENDING.unlink()
        done.append(name)
        say(f"rotate: {name} changed" + (f" in {HELD[name][0]}" if name in HELD else ""))
    for name in (n for n in names if n in MADE):
        what, files, _ = MADE[name]
        for f in files:  # the services hold them in memory until the restart
            f.unlink(missing_ok=True)
        done.append(name)
        say(f"rotate: {name} removed ({what}); the restart makes a new one")
    return done


def applies_to(ctx: Ctx) -> str:
    """The line on what every other host must do now."""
    return ("the old values are refused now: hand every other host a new bundle "
            "(`scripts/stack.sh bundle FILE`, then `join FILE` on each worker host and "
            "`env --bundle FILE` in each shell)" if ctx.remote else
            "the old values are refused now: shells run `eval \"$(scripts/stack.sh env)\"` again")
