"""The command ``python -m pipeline.tune [--apply [--dry-run]] [--params FILE]``."""

from __future__ import annotations

import argparse
import sys

from pipeline.entry import run_entry
from pipeline.settings import read_params as params

from .apply import apply_best, shadowed
from .spec import load_spec
from .study import open_storage, tune

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the study (or, with ``--apply``, merge its best values) under the pipeline's entry
    contract (``pipeline.entry``): 2 on bad input, which is refused with one ``error:`` line
    before Prefect, MLflow or Optuna start."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.tune",
                                 description=sys.modules[__package__].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the params file (params.yaml)")
    ap.add_argument("--apply", action="store_true",
                    help="merge tune.best_out into the params file's train: section, then exit")
    ap.add_argument("--dry-run", action="store_true", help="with --apply: only show changes")
    a = ap.parse_args(argv)
    if a.apply:
        return run_entry(lambda: _apply(a.params, a.dry_run), services=False)
    return run_entry(lambda: tune(a.params), check=lambda: open_storage(
        load_spec(a.params)))  # bad input refused before Prefect, MLflow or Optuna start


def _apply(params_file: str, dry_run: bool) -> None:
    changes = apply_best(params_file, dry_run=dry_run)
    for k, (old, new) in changes.items():
        print(f"train.{k}: {'(not set)' if old is None else repr(old)} -> {new!r}")
    verb = "would change" if dry_run else "changed"
    print(f"{params_file}: {verb} {len(changes)} value(s) under train:"
          + ("" if changes else " (already up to date)"))
    for setting, key in shadowed(params(params_file), changes):
        print(f"note: {setting} overrides train.{key} in that stage")
