"""Stage `pareto_official`: the Pareto points of the official weights (``profile.pareto.models``),
scored on ``profile.pareto.sets`` and timed on ``profile.input_dir`` once, into
``profile.pareto.official_out`` (reports/pareto_official.json), which the profile stage reads
instead of scoring them on every repro.

Its inputs are the settings of those points, the embedded sets and the code that scores them,
never the training: a repro that changes the training params (or the trained weights) does not
run it. The file is committed with ``dvc.lock``, so a fresh clone whose code matches the lock
does not run it either. The official files live outside the repository (``../shared``), so
they are not DVC deps: the file records each one's sha256, and the profile stage uses a point
only while the file there has that sha256 (otherwise it scores that model itself and says so);
an absent file is listed as absent. Each point's runtime records the machine it was timed on
(``rlfn.profile.timing_machine``); see ``pipeline.pareto`` for how the profile stage reuses it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
from prefect import flow

from pipeline.entry import log, main
from pipeline.pareto import available_sets, official_settings, pareto_point
from pipeline.settings import Settings, load_settings
from pipeline.tracking import stage_run
from rlfn.io import sha256_file, write_json
from rlfn.profile import timing_machine
from rlfn.threads import configure_threads


def official_points(s: Settings) -> dict:
    """The file's content: settings, machine, one entry per official model (absent ones
    listed)."""
    pp = s.profile.pareto
    sets = available_sets(pp)
    out = {"settings": official_settings(s, sets), "machine": timing_machine(), "models": [],
           "absent": []}
    timed: dict = {}
    for f in pp.models:
        if not Path(f).is_file():
            log.warning(f"pareto_official: {f} not found; left out of the Pareto chart")
            out["absent"].append(f)
            continue
        c = {"label": Path(f).stem, "kind": "official", "path": Path(f),
             "sha256": sha256_file(f)}
        rows, rt, arch = pareto_point(c, s.scale, pp, s.profile.input_dir, sets, timed) \
            if sets else ([], {}, None)
        timed.update(rt)
        runtime = next(iter(rt.values()), None)
        out["models"].append({"path": f, "label": c["label"], "sha256": c["sha256"],
                              "arch": arch, "rows": rows,
                              "runtime": None if runtime is None else
                              {k: runtime[k] for k in ("median_ms", "params", "images",
                                                       "threads") if k in runtime}})
    return out


@flow(name="rlfn-pareto-official", flow_run_name="pareto_official")
def pareto_official(settings: Settings | None = None) -> dict:
    s = settings or load_settings()
    p = s.profile
    if p.threads:
        configure_threads(p.threads)
    with stage_run("pareto_official", s, s.section("profile")["pareto"]):
        out = official_points(s)
        write_json(p.pareto.official_out, out)
        mlflow.log_artifact(p.pareto.official_out)
        for m in out["models"]:
            for row in m["rows"]:
                mlflow.log_metric(f"pareto.{m['label']}.{row['set']}.psnr_y", row["psnr_y"])
                log.info(f"  pareto_official {m['label']:<16} {row['set']:<6} "
                         f"{row['psnr_y']:.3f} dB  {row['runtime_ms']:.1f} ms")
        absent = f", {len(out['absent'])} absent" if out["absent"] else ""
        log.info(f"pareto_official: {len(out['models'])} official models scored{absent} "
                 f"-> {p.pareto.official_out}")
        return out


if __name__ == "__main__":
    sys.exit(main(pareto_official))
