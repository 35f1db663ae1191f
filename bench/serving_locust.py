"""The locustfile of ``bench/serving_load.py`` (run by it: ``locust --headless``); not a
benchmark on its own.

Each user is a closed-loop client: it posts one LR image after another (base64 PNG in the
``image`` column, as a caller of the endpoint does), with no pause, starting at its own offset
in the image list so that the clients send a mix of sizes at any moment. A request's time is
end to end on the client: sending the prepared body, the answer read, its JSON parsed and its
PNG base64-decoded and checked (the signature and the 4x size from the PNG header, not a full
decode: the clients share one CPU thread under gevent). Every request is one line of
``RLFN_LOAD_OUT`` (JSON): start, seconds, status, image, bytes, problem. The run stops after
``RLFN_LOAD_REQUESTS`` requests in all (and after locust's ``--run-time``).

Settings (environment): ``RLFN_LOAD_IMAGES`` (a JSON list of LR PNG files), ``RLFN_LOAD_OUT``,
``RLFN_LOAD_REQUESTS``, ``RLFN_LOAD_SCALE`` (4).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import struct
import time

import gevent
from locust import FastHttpUser, constant, events, task
from locust.exception import StopUser

PNG_SIG = b"\x89PNG\r\n\x1a\n"
_paths = json.loads(os.environ["RLFN_LOAD_IMAGES"])
_limit = int(os.environ.get("RLFN_LOAD_REQUESTS", "100"))
_scale = int(os.environ.get("RLFN_LOAD_SCALE", "4"))
_out = open(os.environ["RLFN_LOAD_OUT"], "a", buffering=1)  # noqa: SIM115 - the run's log
_count = itertools.count()
_users = itertools.count()


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR."""
    return struct.unpack(">II", png[16:24])


def _body(path: str) -> tuple[bytes, tuple[int, int]]:
    with open(path, "rb") as f:
        png = f.read()
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(png).decode("ascii")]]}}).encode()
    return body, _png_size(png)


_bodies = [(os.path.basename(p), *_body(p)) for p in _paths]


class Client(FastHttpUser):
    wait_time = constant(0)
    network_timeout = 900.0
    connection_timeout = 60.0

    def on_start(self) -> None:
        k = next(_users)
        self._order = itertools.cycle(_bodies[k % len(_bodies):] + _bodies[:k % len(_bodies)])

    @task
    def upscale(self) -> None:
        n = next(_count)
        if n >= _limit:  # the bound reached: quit from a greenlet of its own, this user stops
            gevent.spawn(self.environment.runner.quit)
            raise StopUser()
        name, body, (w, h) = next(self._order)
        problem, status, got = "", 0, 0
        t0 = time.perf_counter()
        start = time.time()
        with self.client.post("/invocations", data=body, catch_response=True,
                              headers={"Content-Type": "application/json"},
                              name="/invocations") as r:
            status = r.status_code or 0
            try:
                raw = r.content or b""
                got = len(raw)
                if status != 200:
                    problem = f"HTTP {status}: {raw[:200].decode(errors='replace')}"
                else:
                    png = base64.b64decode(json.loads(raw)["predictions"][0]["image"])
                    if png[:8] != PNG_SIG:
                        problem = "the answer is not a PNG"
                    elif _png_size(png) != (w * _scale, h * _scale):
                        problem = f"answer {_png_size(png)}, expected {(w * _scale, h * _scale)}"
            except Exception as e:  # noqa: BLE001 - a failed request, recorded
                problem = f"{type(e).__name__}: {e}"
            seconds = time.perf_counter() - t0
            if problem:
                r.failure(problem)
            else:
                r.success()
        _out.write(json.dumps({"start": start, "s": seconds, "status": status, "image": name,
                               "lr": [w, h], "request_bytes": len(body),
                               "response_bytes": got, "problem": problem}) + "\n")


@events.quitting.add_listener
def _close(**_kw) -> None:
    _out.close()
