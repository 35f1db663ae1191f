"""prefect.yaml declares a deployment for every stage flow, and each entrypoint loads as a
real Prefect flow."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_has_a_deployment_that_loads():
    from prefect.flows import Flow, load_flow_from_entrypoint

    doc = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    entries = {d["name"]: d["entrypoint"] for d in doc["deployments"]}
    stages = {p.stem for p in (ROOT / "pipeline").glob("*.py")} - {"__init__", "_common",
                                                                   "registry"}
    assert stages <= set(entries), stages - set(entries)
    for name, entrypoint in entries.items():
        path, func = entrypoint.split(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + func)
        assert isinstance(flow, Flow), name
        assert flow.name.startswith("rlfn-"), flow.name
