"""``python keep.py NAME -- CMD...``: run daemon ``CMD`` and start it again when it exits on its
own, as systemd's ``Restart=on-failure`` does on a real host (the stack starts its daemons
itself, also in the tests' network namespaces, where there is no init to ask).

For the Prefect workers (``worker``, ``rollout-worker``, a joined host's ``worker``): a worker
exits, by Prefect's design, once its polls have failed 3 times in a row in 4 rounds of backoff
(``critical_service_loop``: about 45 s at a 1 s poll, 7.5 minutes at Prefect's default 10 s),
e.g. while the server host's PostgreSQL restarts, and the flow runs it started end with it.
Found by chaos case 1 across hosts: after a minute without PostgreSQL every worker host's
worker was gone for good, until someone ran ``join`` again. Started again here, it takes the
pool's runs as soon as the server answers.

A stop (SIGTERM/SIGINT to this process: ``down``) is passed to the daemon and ends the loop.
A daemon that exits within ``QUICK_S`` of its start ``GIVE_UP`` times in a row is not started
again (a configuration error, not an outage): this process exits with its code. Standard
library only: it runs before anything else is importable."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

QUICK_S = 30.0
GIVE_UP = 5
DELAYS = (5, 10, 20, 40, 60)  # seconds before each restart in a row, the last one repeated


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: keep.py NAME -- CMD...", file=sys.stderr)
        return 2
    name, cmd = argv[0], argv[2:]
    state = {"stopping": False, "child": None}

    def stop(signum, frame):  # noqa: ARG001 - signal handler's signature
        state["stopping"] = True
        if state["child"] is not None and state["child"].poll() is None:
            state["child"].send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    quick = restarts = 0
    while True:
        started = time.monotonic()
        state["child"] = subprocess.Popen(cmd)
        code = state["child"].wait()
        if state["stopping"]:
            return code
        ran = time.monotonic() - started
        quick = quick + 1 if ran < QUICK_S else 0
        restarts = restarts + 1 if ran < 600 else 1  # a long run: a first restart
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if quick >= GIVE_UP:
            print(f"=== {stamp} keep: {name} exited {code} {quick} times in a row within "
                  f"{QUICK_S:g} s of its start: not started again", flush=True)
            return code or 1
        delay = DELAYS[min(restarts, len(DELAYS)) - 1]
        print(f"=== {stamp} keep: {name} exited {code} after {ran:.0f} s; starting it again "
              f"in {delay} s", flush=True)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not state["stopping"]:
            time.sleep(0.2)
        if state["stopping"]:
            return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
