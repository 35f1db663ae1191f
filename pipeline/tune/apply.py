"""``--apply``: merge the best trial's values (``tune.best_out``) into params.yaml's ``train:``
section, changing only those values' text (comments, order and formatting kept)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.settings import TuneSettings, load_section
from pipeline.settings import read_params as params

from .spec import TRAIN_KEYS, TuneError

__all__ = ["merge_train_text", "apply_best"]


def _scalar(key: str, v: Any) -> str:
    """``v`` as a one-line YAML scalar."""
    if not (v is None or isinstance(v, (bool, int, float, str))):
        raise TuneError(f"train.{key}", f"cannot merge {v!r}: not a scalar")
    text = yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()
    return text[:-3].strip() if text.endswith("\n...") or text.endswith("...") else text


def merge_train_text(text: str, values: dict[str, Any], where: str = "params file") -> str:
    """``text`` (a params.yaml; ``where`` names it in errors) with ``values`` set under its
    top-level ``train:`` mapping, every other byte unchanged: each value's scalar is replaced
    in place (an end-of-line comment keeps its column), a missing key is added as a line after
    the last one."""
    root = yaml.compose(text)
    train = None
    if isinstance(root, yaml.MappingNode):
        train = next((v for k, v in root.value if k.value == "train"), None)
    if not isinstance(train, yaml.MappingNode) or train.flow_style or not train.value:
        raise TuneError(where, "no block-style train: mapping to merge into")
    spans, found = [], {k.value: (k, v) for k, v in train.value}
    for key, value in values.items():
        if key in found:
            node = found[key][1]
            if not isinstance(node, yaml.ScalarNode):
                raise TuneError(where, f"train.{key} is not a scalar")
            spans.append((node.start_mark.index, node.end_mark.index, _scalar(key, value)))
    out = text
    for a, b, new in sorted(spans, reverse=True):
        line_end = out.find("\n", b)
        line_end = len(out) if line_end < 0 else line_end
        rest = out[b:line_end]
        if rest.strip().startswith("#"):  # keep the comment's column
            pad = max(1, len(rest) - len(rest.lstrip()) - (len(new) - (b - a)))
            rest = " " * pad + rest.lstrip()
        out = out[:a] + new + rest + out[line_end:]
    added = [f"{key}: {_scalar(key, v)}" for key, v in values.items() if key not in found]
    if added:
        indent = " " * train.value[0][0].start_mark.column
        last = max(v.end_mark.line - 1 if isinstance(v, yaml.ScalarNode)
                   and v.end_mark.column == 0 else v.end_mark.line for _, v in train.value)
        lines = out.split("\n")
        lines[last + 1:last + 1] = [indent + a for a in added]
        out = "\n".join(lines)
    return out


def apply_best(params_file: str = "params.yaml", best_file: str | None = None,
               dry_run: bool = False) -> dict[str, tuple[Any, Any]]:
    """Merge ``best_file``'s ``train:`` values into ``params_file``'s ``train:`` section,
    changing only those values' text (comments, order and formatting kept). Returns
    {key: (old, new)} of the values that changed."""
    prm = params(params_file)
    tune = load_section("tune", params_file)
    best_path = Path(best_file or (tune.best_out if tune is not None
                                   else TuneSettings.model_fields["best_out"].default))
    if not best_path.exists():
        raise TuneError(best_path, "no such file (run python -m pipeline.tune first)")
    best = (yaml.safe_load(best_path.read_text()) or {}).get("train")
    if not isinstance(best, dict) or not best:
        raise TuneError(best_path, "no train values to merge (no COMPLETE trial yet?)")
    bad = sorted(set(best) - TRAIN_KEYS)
    if bad:
        raise TuneError(best_path, f"{', '.join(bad)} not training settings")
    train = prm.get("train") if isinstance(prm.get("train"), dict) else {}
    changes = {k: (train.get(k), v) for k, v in best.items()
               if k not in train or train[k] != v or type(train[k]) is not type(v)}
    if changes and not dry_run:
        path = Path(params_file)
        text = merge_train_text(path.read_text(), {k: v for k, (_, v) in changes.items()},
                                where=str(params_file))
        check = yaml.safe_load(text)
        if {k: check["train"].get(k) for k in best} != best or \
                {k: v for k, v in check.items() if k != "train"} != \
                {k: v for k, v in prm.items() if k != "train"}:
            raise TuneError(params_file, "merging changed more than train values; not "
                            "written. Merge by hand:\n" + yaml.safe_dump({"train": best}))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return changes


def shadowed(prm: dict, keys) -> list[tuple[str, str]]:
    """``(setting, key)`` for each stage setting that overrides ``train.<key>`` in its stage:
    ``train_stages.<k>.<key>``."""
    out = []
    stages = prm.get("train_stages")
    for k, sec in (stages.items() if isinstance(stages, dict) else ()):
        out += [(f"train_stages.{k}.{key}", key) for key in keys
                if isinstance(sec, dict) and key in sec]
    return out
