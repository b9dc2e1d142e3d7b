"""Rendering a config: as a dict, and as YAML with each field's help string as a comment.

Kept apart from config.py (the schema and its loading); `hybridrl.config` re-exports both functions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import fields, is_dataclass


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg, comments: bool = False) -> str:
    """The config as YAML; with `comments`, each field's help string follows it."""
    import yaml

    class Dumper(yaml.SafeDumper):   # sections in block style, lists on one line
        pass
    Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
    if not comments:
        return yaml.dump(to_dict(cfg), Dumper=Dumper, sort_keys=False, default_flow_style=False, width=120)
    return "\n".join(_commented(cfg, 0)) + "\n"


def _commented(obj, indent: int):
    import yaml
    pad = " " * indent
    for fld in fields(obj):
        value, help = getattr(obj, fld.name), fld.metadata.get("help", "")
        if is_dataclass(value):
            yield f"{pad}{fld.name}:  # {help}"
            yield from _commented(value, indent + 2)
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
            yield f"{pad}{fld.name}: {text.removesuffix('...').strip()}  # {help}"
