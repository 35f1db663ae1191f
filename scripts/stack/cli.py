"""The verbs ``up``, ``env``, ``status``, ``down`` (each an iteration over ``TABLE``), ``bundle``,
``join`` and ``rotate``."""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Callable

from stack.core import (HOST, HOST_VAR, LOGS, RUN, SECRETS, STACK, STATE, StackError,
                        check_host, ensure_secrets, load_secrets, log_path, read_json, rel, say,
                        write_private)
from stack.services import TABLE, Service, active, client_exports, context, wanted_secrets


def in_order(table: tuple[Service, ...], start: Callable[[Service], bool],
             skip: Callable[[Service, str], None]) -> None:
    """``start(entry)`` (True when it came up) for each entry once all it needs are up, as many
    at once as may be; an entry one of whose needs did not come up is not started:
    ``skip(entry, called)``, ``called`` naming the entry that failed. Skips are decided here,
    in table order, so their lines come in that order; as the table is in dependency order,
    nothing is pending once nothing runs."""
    cause: dict[str, str] = {}  # entry -> "" when up, else the `called` of the one that failed
    pending = list(table)
    running: dict[Future, Service] = {}
    with ThreadPoolExecutor(len(table)) as ex:
        while True:
            for s in list(pending):
                if not all(n in cause for n in s.needs):
                    continue
                pending.remove(s)
                failed = next((cause[n] for n in s.needs if cause[n]), "")
                if failed:
                    cause[s.name] = failed
                    skip(s, failed)
                else:
                    running[ex.submit(start, s)] = s
            if not running:
                return
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                s = running.pop(f)
                cause[s.name] = "" if f.result() else s.called


def _host_of_up(flag: str | None) -> str:
    """The address ``up`` listens on: ``--host``, else RLFN_STACK_HOST, else the last ``up``'s,
    else 127.0.0.1; checked (StackError naming where it came from)."""
    if flag is not None:
        return check_host(flag, "--host")
    if os.environ.get(HOST_VAR):
        return check_host(os.environ[HOST_VAR], HOST_VAR)
    was = read_json(STATE).get("host") or HOST
    return check_host(was, f"the last up's address ({rel(STATE)}; --host changes it)")


def cmd_up(host: str | None = None) -> int:
    """Start what is not running, each entry once those it needs are up; one line each and
    one for the whole; 1 if any failed."""
    from stack import join

    if join.joined():
        say(f"error: up: {rel(STACK)} is a worker host's (it joined "
            f"{join.joined()['server']}): `scripts/stack.sh join FILE` starts its worker again",
            err=True)
        return 2
    try:
        os.environ[HOST_VAR] = _host_of_up(host)
    except StackError as e:
        say(f"error: {e}", err=True)
        return 2
    t0 = time.monotonic()
    for d in (STACK, RUN, LOGS):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(STACK, 0o711)  # the postgres OS user passes through to postgres/ (as root)
    os.chmod(RUN, 0o700)
    os.chmod(LOGS, 0o711)  # postgres writes its log (a file of its own) here
    try:
        ctx = context(ensure_secrets(wanted_secrets()))
    except StackError as e:
        say(str(e), err=True)
        return 1
    write_private(STATE, json.dumps(ctx.recorded(), indent=1) + "\n", 0o644)
    failed: list[str] = []

    def start(s: Service) -> bool:
        t = time.monotonic()
        try:
            msg = s.start(ctx)
        except StackError as e:
            failed.append(s.name)
            say(f"FAILED {e}", err=True)
            return False
        except Exception as e:  # noqa: BLE001 - one line, the log has the rest
            failed.append(s.name)
            first = (str(e).strip().splitlines() or [""])[0]
            say(f"FAILED {s.name}: {type(e).__name__}: {first}; read {rel(log_path(s.log))}",
                err=True)
            return False
        say(f"{s.name:<11} {msg} ({time.monotonic() - t:.1f} s)")
        return True

    def skip(s: Service, called: str) -> None:
        if s.where is not None:
            failed.append(s.name)
            say(f"FAILED {s.name}: not started at {s.where(ctx)}: {called} is not up", err=True)

    in_order(active(ctx), start, skip)
    took = time.monotonic() - t0
    if failed:
        say(f"stack: up failed ({', '.join(failed)}) after {took:.1f} s; state in {rel(STACK)}",
            err=True)
        return 1
    say(f"stack: up in {took:.1f} s (state in {rel(STACK)}); "
        'for a shell: eval "$(scripts/stack.sh env)"')
    return 0


def cmd_env(bundle_file: str | None = None) -> int:
    """The exports a client shell needs, as ``export`` lines; 1 before the first ``up``. With
    ``--bundle FILE``: those of the team's bundle (another host's stack), its CA and keys put
    where this client keeps them (``bundle.client_exports``); 2 with one ``error:`` line for a
    bad bundle."""
    if bundle_file is not None:
        from pathlib import Path

        from stack import bundle

        try:
            exports = bundle.client_exports(Path(bundle_file))
        except StackError as e:
            say(f"error: {e}", err=True)
            return 2
    else:
        try:
            sec = load_secrets()
        except StackError as e:
            say(f"stack: {e}", err=True)
            return 1
        exports = client_exports(context(sec))
    for k, v in exports.items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


def cmd_bundle(file: str) -> int:
    """``bundle FILE``: the team's bundle of this stack (see ``stack.bundle``); 2 with one
    ``error:`` line when there is none to make."""
    from pathlib import Path

    from stack import bundle

    try:
        ctx = context(load_secrets())
        say(bundle.write(ctx, client_exports(ctx), Path(file)))
    except StackError as e:
        msg = str(e)
        say(f"error: {msg if msg.startswith('bundle:') else 'bundle: ' + msg}", err=True)
        return 2
    return 0


def cmd_status() -> int:
    """A row for each service: up, or DOWN and why; 1 if any is down. On a worker host
    (``join``): its worker's row."""
    from stack import join

    if join.joined():
        return join.status()
    ctx = context(read_json(SECRETS) or None)
    rows = [s for s in active(ctx) if s.health is not None]
    with ThreadPoolExecutor(len(rows)) as ex:
        problems = list(ex.map(lambda s: s.health(ctx), rows))
    down = 0
    for s, problem in zip(rows, problems):
        if problem is None:
            say(f"{s.name:<11} up    {s.row(ctx)}")
        else:
            down += 1
            say(f"{s.name:<11} DOWN  {s.row(ctx)}: {problem}; read {rel(log_path(s.log))}")
    if down:
        say(f"stack: {down} of {len(rows)} services down (start them: scripts/stack.sh up)",
            err=True)
    return 1 if down else 0


def cmd_down() -> int:
    """Stop every service, in reverse table order, keeping the data; 1 if one could not be."""
    from stack import join

    if not STACK.exists():
        say(f"stack: nothing at {STACK}")
        return 0
    if join.joined():
        return join.down()
    rc = 0
    remote = context(None).remote
    for s in reversed(TABLE):
        if s.stop is None:
            continue
        try:
            msg = s.stop(s.name)
            if s.remote_only and not remote and msg == "not running":
                continue
            say(f"{s.name:<11} {msg}")
        except StackError as e:
            say(f"FAILED {e}", err=True)
            rc = 1
    say(f"stack: down (data kept in {rel(STACK)})")
    return rc


def cmd_rotate(args: list[str]) -> int:
    """``rotate NAME... | all``: new values for those secrets (``stack.rotate``), then every
    service restarted with them (``down``, ``up``); 2 with one ``error:`` line when nothing
    could be rotated, 1 when the restart failed."""
    from stack import join, rotate

    if join.joined():
        say("error: rotate: this is a worker host's stack (it joined "
            f"{join.joined()['server']}): rotate on the server host, then `join` the new bundle",
            err=True)
        return 2
    by_name = {s.name: s for s in TABLE}
    try:
        wanted = wanted_secrets()
        remote = context(load_secrets()).remote
        done = rotate.rotate(rotate.names_of(args, wanted, remote), wanted, context,
                             lambda name, ctx: by_name[name].health(ctx))
    except StackError as e:
        say(f"error: {e}", err=True)
        return 2
    cmd_down()
    rc = cmd_up(None)
    ctx = context(load_secrets())
    say(f"stack: rotated {', '.join(done)} and restarted every service"
        f"{'' if rc == 0 else ' (its up FAILED: read the lines above)'}; "
        f"{rotate.applies_to(ctx)}", err=rc != 0)
    return 1 if rc else 0


def locked(fn: Callable[[], int]) -> Callable[[], int]:
    """``fn`` with the stack's lock held: one `up` or `down` at a time."""
    def run() -> int:
        import fcntl

        if not STACK.exists():  # nothing to guard yet (`up` makes it)
            return fn()
        RUN.mkdir(parents=True, exist_ok=True)
        with open(RUN / "lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"stack: another `up` or `down` is running on {rel(STACK)}; waiting", err=True)
                fcntl.flock(f, fcntl.LOCK_EX)
            return fn()
    return run


USAGE = ("usage: scripts/stack.sh up [--host ADDR] | env [--bundle FILE] | status | down | "
         "bundle FILE | join FILE [--pool NAME] | rotate NAME... | rotate all")


def main(argv: list[str]) -> int:
    """Run the verb ``argv`` names; 2 with a usage line for anything else, one ``error:`` line
    for a bad option."""
    cmds = {"up": cmd_up, "env": cmd_env, "status": cmd_status, "down": cmd_down,
            "bundle": cmd_bundle, "join": None, "rotate": None}
    if not argv or argv[0] not in cmds:
        print(USAGE, file=sys.stderr)
        return 2
    verb, rest = argv[0], argv[1:]
    if verb == "rotate":
        if any(a.startswith("-") for a in rest):
            print(f"error: rotate: no options, only secret names\n{USAGE}", file=sys.stderr)
            return 2
        return locked(lambda: cmd_rotate(rest))()
    if verb == "bundle":
        if len(rest) != 1 or rest[0].startswith("-"):
            print(f"error: bundle: give one FILE to write\n{USAGE}", file=sys.stderr)
            return 2
        return cmd_bundle(rest[0])
    opts: dict[str, str] = {}
    if verb == "join":
        if not rest or rest[0].startswith("-"):
            print(f"error: join: give the bundle FILE first\n{USAGE}", file=sys.stderr)
            return 2
        opts["file"] = rest.pop(0)
    allowed = {"up": ("--host",), "env": ("--bundle",), "join": ("--pool",)}.get(verb, ())
    while rest:
        flag = rest.pop(0)
        value = None
        if "=" in flag and flag.startswith("--"):
            flag, value = flag.split("=", 1)
        if flag not in allowed:
            print(f"error: {verb}: unknown option {flag!r}\n{USAGE}", file=sys.stderr)
            return 2
        if value is None:
            if not rest:
                print(f"error: {verb} {flag}: needs a value", file=sys.stderr)
                return 2
            value = rest.pop(0)
        opts[flag.lstrip("-")] = value
    if verb == "join":
        from stack.join import cmd_join
        from stack.prefect_server import POOL

        def fn() -> int:
            return cmd_join(opts["file"], opts.get("pool", POOL))
    else:
        fn = {"up": lambda: cmd_up(opts.get("host")), "down": cmd_down,
              "env": lambda: cmd_env(opts.get("bundle"))}.get(verb, cmds[verb])
    return locked(fn)() if verb in ("up", "down", "join") else fn()
