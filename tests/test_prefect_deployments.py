"""prefect.yaml declares a deployment for every stage flow, and each entrypoint loads as a
real Prefect flow. Entrypoints are module paths (``pipeline.profile:profile``): a file path
would put ``pipeline/`` on sys.path, where ``pipeline/profile.py`` shadows the standard
library's ``profile`` (which torch imports through cProfile)."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_has_a_deployment_that_loads():
    import sys

    from prefect.flows import Flow, load_flow_from_entrypoint

    # this checkout's pipeline package, not a copy an earlier test imported (loading a logged
    # pyfunc puts the model's own code folder, a part of pipeline/, first on sys.path)
    for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        del sys.modules[name]
    sys.path.insert(0, str(ROOT))

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entries = {d["name"]: d["entrypoint"] for d in doc["deployments"]}
    stages = {p.stem for p in (ROOT / "pipeline").glob("*.py")} - {
        "__init__", "_common", "settings", "stage_config", "services",  # helpers
        "repro_server",
        "ablation_report"}  # a report generator over `dvc exp show`, not a flow
    modules = {e.split(":")[0].removeprefix("pipeline.") for e in entries.values()}
    assert stages <= modules, stages - modules
    for name, entrypoint in entries.items():
        module, _ = entrypoint.split(":")
        assert module.startswith("pipeline.") and not module.endswith(".py"), entrypoint
        flow = load_flow_from_entrypoint(entrypoint)
        assert isinstance(flow, Flow), name
        assert flow.name.startswith("rlfn-"), flow.name
    import importlib.util

    assert "pipeline" not in importlib.util.find_spec("profile").origin
