"""The one YAML number rule of the project's config files (``params.yaml``, a stage config).

YAML 1.1 (PyYAML) reads ``2e5`` or ``1e-3`` (no dot) as a *string*; ``yaml_number`` takes such
a string as the number it spells. Used by the training config (``rlfn.train.config``) and the
pipeline's settings (``pipeline.settings``: the ``tune:`` section); imports nothing heavy.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

__all__ = ["yaml_number"]


def yaml_number(value: Any, where: str, integer: bool = False, finite: bool = True,
                error: type[ConfigError] = ConfigError) -> int | float:
    """``value`` as a float (``integer``: an int, from an integer-valued number too), else
    ``error(where, "expected a number, got ...")`` / ``"expected an integer, got ..."``.
    Booleans are not numbers; ``finite``: neither are inf and nan."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise error(where, f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            finite and not math.isfinite(value)):
        raise error(where, f"expected a number, got {value!r}")
    if integer:
        if not math.isfinite(value) or float(value) != int(value):
            raise error(where, f"expected an integer, got {value!r}")
        return int(value)
    return float(value)
