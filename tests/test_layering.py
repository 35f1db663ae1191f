"""The layering of the two packages: ``rlfn`` (the library) never imports the orchestration layer
(Prefect, DVC, MLflow, nor ``pipeline/`` itself), and ``import rlfn`` alone stays light.

Each check runs in a fresh interpreter, so nothing this test process has imported counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("prefect", "dvc", "mlflow", "pipeline")


def _python(code: str) -> dict:
    # cwd=ROOT: `rlfn` (and `pipeline`, were anything to import it) resolve to this checkout
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-5000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _package_modules() -> set[str]:
    """Every module of ``rlfn`` by its files (to show the walk below missed none)."""
    pkg = ROOT / "rlfn"
    out = set()
    for f in pkg.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.add(".".join(parts))
    return out


WALK = """
import importlib, json, pkgutil, sys
import rlfn
forbidden = %r
def bad():
    return {m.split(".")[0] for m in sys.modules if m.split(".")[0] in forbidden}
seen, failed, culprits = [], {}, {}
def onerror(name):
    failed[name] = repr(sys.exc_info()[1])
for m in pkgutil.walk_packages(rlfn.__path__, "rlfn.", onerror=onerror):
    seen.append(m.name)
    if m.name.rsplit(".", 1)[-1] == "__main__":  # `python -m rlfn`: runs the CLI on import
        continue
    before = bad()
    try:
        importlib.import_module(m.name)
    except Exception as e:
        failed[m.name] = repr(e)
    if bad() - before:  # the first module that brought each one in
        culprits[m.name] = sorted(bad() - before)
print(json.dumps({"seen": seen, "failed": failed, "file": rlfn.__file__,
                  "forbidden": sorted(bad()), "culprits": culprits}))
""" % (FORBIDDEN,)


def test_no_rlfn_module_imports_the_orchestration_layer():
    """Import every module of ``rlfn`` (pkgutil.walk_packages): none of Prefect, DVC, MLflow or
    ``pipeline`` may end up in sys.modules."""
    r = _python(WALK)
    assert Path(r["file"]).resolve() == ROOT / "rlfn" / "__init__.py", r["file"]
    assert not r["failed"], r["failed"]
    assert set(r["seen"]) | {"rlfn"} == _package_modules(), \
        _package_modules() ^ (set(r["seen"]) | {"rlfn"})
    assert {"rlfn.cli", "rlfn.infer", "rlfn.train.engine", "rlfn.data.manifest"} <= set(r["seen"])
    assert r["forbidden"] == [], \
        f"{r['forbidden']} imported by {r['culprits'] or '`import rlfn` itself'}"


LIGHT = """
import json, sys
import rlfn
loaded = sorted(m for m in sys.modules if m == "rlfn" or m.startswith("rlfn."))
names = {n: type(getattr(rlfn, n)).__name__ for n in rlfn.__all__}  # the API still resolves
print(json.dumps({"loaded": loaded, "names": names}))
"""


def test_import_rlfn_alone_stays_light():
    """``import rlfn`` must not pull in training, the data pipeline or the inference backends:
    they load when first used."""
    r = _python(LIGHT)
    heavy = [m for m in r["loaded"]
             if m.split(".")[:2] in (["rlfn", "train"], ["rlfn", "data"], ["rlfn", "infer"])]
    assert heavy == [], f"import rlfn loaded {heavy} (all loaded: {r['loaded']})"
    assert r["names"], "rlfn.__all__ is empty"
