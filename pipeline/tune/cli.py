"""The command ``python -m pipeline.tune [--apply [--dry-run]] [--params FILE]``."""

from __future__ import annotations

import argparse
import sys

from pipeline._common import params
from rlfn.errors import ConfigError

from .apply import apply_best, shadowed
from .spec import load_spec
from .study import open_storage, tune

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the study (or, with ``--apply``, merge its best values); 2 on bad input, which is
    refused with one ``error:`` line before Prefect, MLflow or Optuna start."""
    ap = argparse.ArgumentParser(prog="python -m pipeline.tune",
                                 description=sys.modules[__package__].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="the params file (params.yaml)")
    ap.add_argument("--apply", action="store_true",
                    help="merge tune.best_out into the params file's train: section, then exit")
    ap.add_argument("--dry-run", action="store_true", help="with --apply: only show changes")
    a = ap.parse_args(argv)
    try:
        if a.apply:
            changes = apply_best(a.params, dry_run=a.dry_run)
            for k, (old, new) in changes.items():
                print(f"train.{k}: {'(not set)' if old is None else repr(old)} -> {new!r}")
            verb = "would change" if a.dry_run else "changed"
            print(f"{a.params}: {verb} {len(changes)} value(s) under train:"
                  + ("" if changes else " (already up to date)"))
            for setting, key in shadowed(params(a.params), changes):
                print(f"note: {setting} overrides train.{key} in that stage")
            return 0
        spec = load_spec(a.params)
        open_storage(spec)  # fail fast, before Prefect and MLflow start
    except (ConfigError, FileNotFoundError) as e:  # TuneError and bad training settings
        print(f"error: {e}", file=sys.stderr)
        return 2
    tune(a.params)
    return 0
