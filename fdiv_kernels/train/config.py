"""``train --config FILE``: a run's settings from a YAML or JSON file, command-line flags overriding them.

The keys are the ``train`` flags' names (``max_steps`` or ``max-steps``); values are checked with the flags' own
types and choices. The ``train_config.json`` a run writes is such a file, so ``train --config
RUN/train_config.json --output NEW`` repeats a run; the fields that record one invocation rather than the run
(``num_processes``, ``distributed_backend``, ``resume``) are left out when reading such a record.
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

from .io import read_text

RECORD_ONLY = ("num_processes", "distributed_backend", "resume")


def read_config_file(path: str | Path) -> dict:
    """The mapping in a ``.json``, ``.yaml`` or ``.yml`` file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config {path} does not exist")
    text = read_text(path, "--config")
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--config {path} is not valid JSON ({err})") from err
    elif path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as err:
            raise ImportError(f"--config {path}: reading YAML needs pyyaml (pip install pyyaml)") from err
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            # One line: where and what (str(err) spans several lines with a source excerpt).
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise ValueError(f"--config {path} is not valid YAML ({where}{getattr(err, 'problem', err)})") from err
    else:
        raise ValueError(f"--config {path}: expected a .json, .yaml or .yml file")
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values, got {type(values).__name__}")
    if "num_processes" in values:  # a run's own train_config.json
        values = {k: v for k, v in values.items() if k not in RECORD_ONLY}
    return values


def _convert(action: argparse.Action, key: str, value, path: Path):
    """``value`` checked against the flag's kind, type and choices (argparse checks only command-line strings)."""
    flag = action.option_strings[-1]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"--config {path}: {key} (flag {flag}) must be true or false; got {value!r}")
        return value
    if value is None:
        if action.required or action.default is not None:  # null is "the default" only where that is None
            raise ValueError(f"--config {path}: {key} (flag {flag}) needs a value; got null")
        return None
    kind = action.type or str
    accepted = {int: (int,), float: (int, float)}.get(kind, (str,))
    if isinstance(value, bool) or not isinstance(value, accepted):
        name = getattr(kind, "__name__", str(kind))
        raise ValueError(
            f"--config {path}: {key} (flag {flag}) must be {'a path' if kind is Path else name}; got {value!r}"
        )
    value = kind(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"--config {path}: {key} (flag {flag}) must be one of {list(action.choices)}; got {value!r}")
    return value


def apply_config_file(parser: argparse.ArgumentParser, path: str | Path) -> None:
    """Make the file's settings ``parser``'s defaults, so that flags given on the command line override them."""
    path = Path(path)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    defaults = {}
    for key, value in read_config_file(path).items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            close = difflib.get_close_matches(dest, actions, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--config {path}: unknown setting {key!r}{hint}")
        defaults[dest] = _convert(actions[dest], key, value, path)
        actions[dest].required = False  # given by the file; the command line may still override it
    parser.set_defaults(**defaults)
