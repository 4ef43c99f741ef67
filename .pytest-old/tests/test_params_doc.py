"""Each param's meaning has one home: its comment in params.yaml (README "Parameters").

The typed config (pipeline/config.py) holds types, ranges and derived values; the README explains
behaviour and points at params.yaml. These tests keep the home complete: every key the config
accepts is in params.yaml, and every leaf there is explained by a comment.
"""

import re
from pathlib import Path

from pipeline.config import Config, Section

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[a-z_0-9]+):(?P<rest>.*)$")


def explained_leaves(lines: list[str]) -> dict[str, bool]:
    """Each leaf key's dotted name -> whether a comment explains it: on its own line, on a comment
    line just above it, or on its parent's line (a mapping of like values, e.g. split: val, test)."""
    leaves, parents, comment_above = {}, [], False
    for line in lines:
        if line.strip().startswith("#"):
            comment_above = True
            continue
        match = KEY_LINE.match(line)
        if not match:
            comment_above = comment_above and line.strip() == ""  # a blank line ends a comment block
            continue
        depth = len(match["indent"]) // 2
        parents = parents[:depth]
        value, _, comment = match["rest"].partition("#")
        explained = bool(comment.strip()) or comment_above or any(has_comment for _, has_comment in parents)
        if value.strip():
            leaves[".".join([name for name, _ in parents] + [match["key"]])] = explained
        else:
            parents.append((match["key"], bool(comment.strip()) or comment_above))
        comment_above = False
    return leaves


def schema_keys(model: type[Section], prefix: str = "") -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        nested = field.annotation if isinstance(field.annotation, type) and issubclass(field.annotation, Section) else None
        keys |= schema_keys(nested, f"{prefix}{name}.") if nested else {prefix + name}
    return keys


def test_every_param_in_params_yaml_is_explained_by_a_comment():
    leaves = explained_leaves(PARAMS.read_text().splitlines())
    assert leaves, "no keys parsed from params.yaml"
    assert [key for key, explained in leaves.items() if not explained] == []


def test_params_yaml_sets_every_key_the_config_accepts():
    leaves = set(explained_leaves(PARAMS.read_text().splitlines()))
    assert leaves == schema_keys(Config)  # no meaning hidden in a config default, none undeclared


def test_the_line_parser_sees_a_missing_comment():
    text = ["train:", "  # phase one", "  epochs: 10", "", "  batch_size: 32", "  split:  # fractions",
            "    val: 0.1"]
    assert explained_leaves(text) == {"train.epochs": True, "train.batch_size": False, "train.split.val": True}
