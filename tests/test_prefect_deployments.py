"""prefect.yaml declares a deployment for every stage flow, and each entrypoint loads as a
real Prefect flow. Entrypoints are module paths (``pipeline.profile:profile``): a file path
would put ``pipeline/`` on sys.path, where ``pipeline/profile.py`` shadows the standard
library's ``profile`` (which torch imports through cProfile)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


LOAD = """
import json, sys
from prefect.flows import Flow, load_flow_from_entrypoint
out = {}
for entrypoint in sys.argv[1:]:
    flow = load_flow_from_entrypoint(entrypoint)
    out[entrypoint] = flow.name if isinstance(flow, Flow) else repr(flow)
print(json.dumps(out))
"""


def test_every_stage_has_a_deployment_that_loads():
    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entries = {d["name"]: d["entrypoint"] for d in doc["deployments"]}
    stages = {p.stem for p in (ROOT / "pipeline").glob("*.py")} - {
        "__init__", "entry", "tracking", "dvcops", "tags",  # the stages' glue
        "settings", "stage_config", "services",
        "repro_server",
        "lineage",  # the report behind `rlfn lineage`, not a flow
        "pareto",  # the Pareto points' code, shared by pareto_official and profile
        "ablation_report"}  # a report generator over `dvc exp show`, not a flow
    modules = {e.split(":")[0].removeprefix("pipeline.") for e in entries.values()}
    assert stages <= modules, stages - modules
    for entrypoint in entries.values():
        module, _ = entrypoint.split(":")
        assert module.startswith("pipeline.") and not module.endswith(".py"), entrypoint
    # in a fresh interpreter in the project folder, as a worker loads them (this process may
    # hold another copy of `pipeline`: loading a logged pyfunc imports the model's own code)
    r = subprocess.run([sys.executable, "-c", LOAD, *entries.values()], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    names = json.loads(r.stdout.strip().splitlines()[-1])
    for name, entrypoint in entries.items():
        assert names[entrypoint].startswith("rlfn-"), (name, names[entrypoint])
    import importlib.util

    assert "pipeline" not in importlib.util.find_spec("profile").origin
