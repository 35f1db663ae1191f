"""``reports/ablations.md`` and ``reports/ablations.png`` from the DVC experiments' metrics.

``python -m pipeline.ablation_report`` runs ``dvc exp show --json`` (``--input FILE``: a saved
copy of its output instead), takes every experiment's ``metrics/ablation.json`` (one row per
``ablation.name``, the newest when a name was run more than once) and writes four tables (body
block, contrastive loss, warm start, EDSR-baseline) with deltas against each group's reference
row, and a chart of PSNR per group. Variants that were not run are listed as "not run"; an
alias (``same_as``, e.g. ``ws_1``) that was not run itself shows its target's row.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipeline.entry import run_entry
from pipeline.settings import read_params as params
from rlfn.errors import ConfigError, RLFNError

__all__ = ["GROUPS", "collect", "render", "chart", "main"]

METRICS_FILE = "metrics/ablation.json"
# (title, reference row, rows, note)
GROUPS: list[tuple[str, str, list[str], str]] = [
    ("Body block", "rlfb", ["rfdb", "rfdb_r48", "rfdb_r52", "rlfb"],
     "The paper's block ablation: RFDB, RFDB without feature distillation (48 and 52 "
     "channels, both inside RFDN's network), and RLFB (4 blocks, no fusion across blocks, "
     "simpler ESA). Same recipe for all four."),
    ("Contrastive loss (last warm-start stage)", "rlfb_no_cl", ["rlfb_no_cl", "rlfb"],
     "RLFN (4 RLFBs), three warm-start stages; the contrastive loss in stage 3 off / on."),
    ("Warm start", "ws_1", ["ws_1", "e2000", "clr"],
     "ws_1: warm-start stages (fresh optimizer and schedule each); e2000: one run of the same "
     "total iterations with a slower step decay; clr: one run, cyclic lr restarting every "
     "stage-length, optimizer state kept. No contrastive loss in any of them."),
    ("EDSR-baseline", "edsr", ["edsr", "edsr_cl_ws"],
     "edsr: one plain run (same total iterations, slower decay); edsr_cl_ws: warm start + "
     "contrastive loss in the last stage."),
]
FULL_SCALE = ("ABLATION_ARGS='-S ablation.base.iterations=200000 -S ablation.base.batch_size=64 "
              "-S ablation.base.patch_size=256 -S ablation.base.lr_step=40000 "
              "-S ablation.base.val_every=5000 -S ablation.base.checkpoint_every=5000 "
              "-S ablation.base.epoch_iterations=1000 -S ablation.base.val_max_images=0' "
              "scripts/ablations.sh")


# ---------------------------------------------------------------- reading dvc exp show
def _records(node: Any, exp: str | None = None):
    """(experiment name, rev data dict) of every revision in ``dvc exp show --json``."""
    if isinstance(node, list):
        for x in node:
            yield from _records(x, exp)
    elif isinstance(node, dict):
        name = node.get("name") if isinstance(node.get("name"), str) else exp
        data = node.get("data")
        if isinstance(data, dict) and ("metrics" in data or "params" in data):
            yield name, data
        for key in ("experiments", "revs"):
            if key in node:
                yield from _records(node[key], name)
        if not isinstance(data, dict):  # an older layout: {rev: {"data": ...}} mappings
            for k, v in node.items():
                if isinstance(v, (dict, list)) and k not in ("experiments", "revs"):
                    yield from _records(v, name)


def _param_name(data: dict) -> str | None:
    for f in (data.get("params") or {}).values():
        a = ((f or {}).get("data") or {}).get("ablation") if isinstance(f, dict) else None
        if isinstance(a, dict) and isinstance(a.get("name"), str):
            return a["name"]
    return None


def collect(show: Any) -> dict[str, dict]:
    """``{ablation name: metrics + {"experiment", "rev", "timestamp"}}`` of the newest
    experiment per name whose params and metrics agree (stale workspace metrics are not
    taken for another name's)."""
    rows: dict[str, dict] = {}
    for exp, data in _records(show):
        m = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data")
        if not isinstance(m, dict) or not isinstance(m.get("name"), str):
            continue
        pname = _param_name(data)
        if pname is not None and pname != m["name"]:
            continue
        row = {**m, "experiment": exp or str(data.get("rev", ""))[:7],
               "rev": data.get("rev"), "timestamp": data.get("timestamp") or ""}
        old = rows.get(m["name"])
        key = (row["experiment"] not in (None, "workspace"), str(row["timestamp"]))
        if old is None or key > (old["experiment"] not in (None, "workspace"),
                                 str(old["timestamp"])):
            rows[m["name"]] = row
    return rows


def dvc_exp_show() -> Any:
    r = subprocess.run(["dvc", "exp", "show", "--json", "--all-commits"], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RLFNError("dvc exp show --json --all-commits",
                        f"exit code {r.returncode}: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout or "[]")


# ---------------------------------------------------------------- rendering
def _f(v: Any, fmt: str, missing: str = "—") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    return format(v, fmt)


def _rows_for(names: list[str], rows: dict, aliases: dict) -> dict[str, dict | None]:
    out = {}
    for n in names:
        r = rows.get(n)
        if r is None and aliases.get(n) in rows:
            r = {**rows[aliases[n]], "alias_of": aliases[n]}
        out[n] = r
    return out


def render(rows: dict, prm: dict) -> str:
    a = prm.get("ablation") or {}
    base, variants = a.get("base") or {}, a.get("variants") or {}
    aliases = {n: v["same_as"] for n, v in variants.items()
               if isinstance(v, dict) and "same_as" in v}
    def used(key, default):  # what the experiments ran with (their metrics), else params
        vals = sorted({str(r.get(key)) for r in rows.values() if r.get(key) is not None})
        return " / ".join(vals) if vals else default

    its = used("iterations_per_stage", base.get("iterations"))
    L = ["# RLFN ablations", "",
         "<!-- Generated by `python -m pipeline.ablation_report` from `dvc exp show --json`: "
         "do not edit by hand. -->", "",
         f"Generated from the DVC experiments' `{METRICS_FILE}` "
         "(`python -m pipeline.ablation_report`); do not edit.", "",
         f"Settings (`params.yaml` `ablation.base`): {its} iterations per stage x "
         f"{a.get('stages', 3)} stages (e2000 / clr: one run of the same total), batch "
         f"{used('batch_size', base.get('batch_size'))}, HR patch "
         f"{used('patch_size', base.get('patch_size'))}, lr step {base.get('lr_step')}, training data `{(prm.get('train') or {}).get('hr_dir')}` "
         "(or the patches store). Scores: Y-PSNR / SSIM on Set5 x4; params and FLOPs on a "
         "256x256 LR input (NTIRE counting); runtime: median CPU ms (eager PyTorch) per "
         f"`{(prm.get('profile') or {}).get('input_dir')}` image used as LR.", "",
         "**Small scale: these numbers show direction, not the paper's values.** Full scale "
         "(DIV2K, the paper's budget, hours on a GPU):", "", f"    {FULL_SCALE}", ""]
    for title, ref, names, note in GROUPS:
        got = _rows_for(names, rows, aliases)
        r0 = got.get(ref)
        L += [f"## {title}", "", note, "",
              "| ablation | model | Set5 PSNR (dB) | Δ vs " + ref + " | SSIM | params (K) | "
              "FLOPs (G) | CPU ms | Δ ms | iterations | train s | experiment |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for n in names:
            r = got[n]
            if r is None:
                L.append(f"| {n} | {_model(variants, n)} | not run |  |  |  |  |  |  |  |  |  |")
                continue
            d_psnr = r["psnr_y"] - r0["psnr_y"] if r0 else None
            d_ms = r["runtime_ms_cpu"] - r0["runtime_ms_cpu"] if r0 else None
            exp = r.get("experiment") or ""
            if r.get("alias_of"):
                exp += f" (= {r['alias_of']})"
            L.append(f"| {n} | {r.get('model')} | {_f(r.get('psnr_y'), '.3f')} | "
                     f"{_f(d_psnr, '+.3f')} | {_f(r.get('ssim_y'), '.4f')} | "
                     f"{_f(r.get('params', float('nan')) / 1e3, '.1f')} | "
                     f"{_f(r.get('flops', float('nan')) / 1e9, '.2f')} | "
                     f"{_f(r.get('runtime_ms_cpu'), '.0f')} | {_f(d_ms, '+.0f')} | "
                     f"{r.get('iterations')} | {_f(r.get('train_seconds'), '.0f')} | {exp} |")
        L.append("")
    missing = [n for n in variants if n not in rows and aliases.get(n) not in rows]
    L += ["## Not run", "", ", ".join(missing) if missing else "none (every variant ran)", "",
          "![PSNR per ablation group](ablations.png)", "",
          "Regenerate: `scripts/ablations.sh` (runs every variant as a DVC experiment, then "
          "this report); the report alone: `python -m pipeline.ablation_report`.", ""]
    return "\n".join(L)


def _model(variants: dict, n: str) -> str:
    v = variants.get(n) or {}
    if "same_as" in v:
        v = variants.get(v["same_as"]) or {}
    return str(v.get("model", ""))


def chart(rows: dict, prm: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = (prm.get("ablation") or {}).get("variants") or {}
    aliases = {n: v["same_as"] for n, v in variants.items()
               if isinstance(v, dict) and "same_as" in v}
    fig, axes = plt.subplots(1, len(GROUPS), figsize=(4.2 * len(GROUPS), 4), squeeze=False)
    for ax, (title, ref, names, _) in zip(axes[0], GROUPS):
        got = _rows_for(names, rows, aliases)
        ys = [got[n]["psnr_y"] if got[n] else float("nan") for n in names]
        colors = ["tab:orange" if n == ref else "tab:blue" for n in names]
        bars = ax.bar(range(len(names)), [0 if math.isnan(y) else y for y in ys], color=colors)
        for b, n, y in zip(bars, names, ys):
            r = got[n]
            label = "not run" if r is None else f"{y:.2f}\n{r['runtime_ms_cpu']:.0f} ms"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()),
                        ha="center", va="bottom", fontsize=7)
        finite = [y for y in ys if not math.isnan(y)]
        if finite:
            lo, hi = min(finite), max(finite)
            ax.set_ylim(lo - max(0.5, hi - lo), hi + max(0.3, (hi - lo) * 0.6))
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("Set5 Y-PSNR (dB), x4")
    fig.suptitle("RLFN ablations (small scale: direction, not the paper's values)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--input", help="a saved `dvc exp show --json` output (default: run it)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="reports/ablations.md")
    ap.add_argument("--png", default=None, help="default: the --out path with .png")
    args = ap.parse_args(argv)
    return run_entry(lambda: _report(args), services=False)


def _report(args: argparse.Namespace) -> None:
    if args.input:
        try:
            show = json.loads(Path(args.input).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(args.input, f"not a readable `dvc exp show --json` output ({e})")
    else:
        show = dvc_exp_show()
    prm = params(args.params)
    rows = collect(show)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(rows, prm))
    png = chart(rows, prm, Path(args.png) if args.png else out.with_suffix(".png"))
    print(f"{out}: {len(rows)} ablation(s) from the experiments; chart {png}")


if __name__ == "__main__":
    sys.exit(main())
