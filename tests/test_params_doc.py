"""Each param is documented once, checkably: its type, range and meaning in pipeline/config.py (a
``Field(description=...)``), docs/params.md generated from that and the backbone registry, and
params.yaml's short comments kept from contradicting them.

The checks: the committed page is what the generator writes; every key the config accepts is in
params.yaml and has a description; every key in params.yaml has a comment; and where a comment lists
a key's choices (``a | b | c``) or states a bound (``at most 0.5``, ``0..100``), they are the schema's.
"""

import re
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic.fields import FieldInfo

from pipeline.config import Config, Section
from pipeline.model.backbones import BACKBONES
from pipeline.tools import params_doc

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[a-z_0-9]+):(?P<rest>.*)$")
CONTINUATION = re.compile(r"^ +#(?P<comment>.*)$")  # an indented comment line under a key's own comment
NUMBER = r"(-?\d+(?:\.\d+)?)"


def commented_leaves(lines: list[str]) -> dict[str, tuple[bool, str]]:
    """Each leaf key's dotted name -> (whether a comment explains it, its own comment's text).

    A comment explains a key on its own line (with the indented comment lines right under it), on a
    comment line just above it, or on its parent's line (a mapping of like values: split: val, test).
    """
    leaves: dict[str, tuple[bool, str]] = {}
    parents: list[tuple[str, bool]] = []
    comment_above, last_leaf, key_end = False, None, 0
    for line in lines:
        continued = CONTINUATION.match(line)
        if last_leaf and continued and line.index("#") > key_end:  # right of the key: its comment goes on
            explained, text = leaves[last_leaf]
            leaves[last_leaf] = (explained, f"{text} {continued['comment'].strip()}")
            continue
        last_leaf = None
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
            last_leaf, key_end = ".".join([name for name, _ in parents] + [match["key"]]), match.end("key")
            leaves[last_leaf] = (explained, comment.strip())
        else:
            parents.append((match["key"], bool(comment.strip()) or comment_above))
        comment_above = False
    return leaves


def schema_leaves(
    model: type[Section] = Config, node: dict[str, Any] | None = None, prefix: str = ""
) -> dict[str, tuple[dict[str, Any], FieldInfo]]:
    """Each key the config accepts -> (its JSON schema, its pydantic field)."""
    schema = Config.model_json_schema()
    node = node or schema
    leaves: dict[str, tuple[dict[str, Any], FieldInfo]] = {}
    for name, field in model.model_fields.items():
        prop = node["properties"][name]
        if "$ref" in prop:
            section = cast(type[Section], field.annotation)
            leaves |= schema_leaves(section, params_doc.resolve(prop, schema), f"{prefix}{name}.")
        else:
            leaves[prefix + name] = (prop, field)
    return leaves


def allowed_values(prop: dict[str, Any]) -> list[str] | None:
    options = [prop, *prop.get("anyOf", []), prop.get("items", {})]
    return next((option["enum"] for option in options if "enum" in option), None)


def listed_choices(comment: str) -> set[str] | None:
    """The choices a comment lists as ``a | b (what b does) | c``: each segment's first word."""
    if "|" not in comment:
        return None
    return {segment.split()[0].strip(":;,.()") for segment in comment.split("|")}


def stated_bounds(comment: str) -> list[tuple[str, float]]:
    """``(kind, number)`` for each bound a comment states: ``at most 0.5``, ``at least 2``, ``0..100``."""
    bounds = [("maximum", float(n)) for n in re.findall(rf"at most {NUMBER}\b", comment)]
    bounds += [("minimum", float(n)) for n in re.findall(rf"at least {NUMBER}\b", comment)]
    for low, high in re.findall(rf"\b{NUMBER}\.\.{NUMBER}\b", comment):
        bounds += [("minimum", float(low)), ("maximum", float(high))]
    return bounds


def schema_bound(prop: dict[str, Any], kind: str) -> float | None:
    options = [prop, *prop.get("anyOf", [])]
    return next((float(option[kind]) for option in options if kind in option), None)


LEAVES = commented_leaves(PARAMS.read_text(encoding="utf-8").splitlines())


def test_docs_params_md_is_what_the_generator_writes():
    assert params_doc.PAGE.read_text(encoding="utf-8") == params_doc.render(), (
        "docs/params.md is out of date: run python -m pipeline.tools.params_doc"
    )


def test_params_yaml_sets_every_key_the_config_accepts():
    assert LEAVES, "no keys parsed from params.yaml"
    assert set(LEAVES) == set(schema_leaves())  # no meaning hidden in a config default, none undeclared


def test_every_key_has_a_description_in_the_config():
    assert [key for key, (_, field) in schema_leaves().items() if not (field.description or "").strip()] == []


def test_every_key_in_params_yaml_has_a_comment():
    assert [key for key, (explained, _) in LEAVES.items() if not explained] == []


@pytest.mark.parametrize("key", sorted(key for key, (prop, _) in schema_leaves().items() if allowed_values(prop)))
def test_choices_a_comment_lists_are_the_allowed_ones(key):
    prop, _ = schema_leaves()[key]
    listed = listed_choices(LEAVES[key][1])
    assert listed is None or listed == set(allowed_values(prop) or []), f"params.yaml comment of {key}"


@pytest.mark.parametrize("key", sorted(key for key, (_, comment) in LEAVES.items() if stated_bounds(comment)))
def test_bounds_a_comment_states_are_the_schemas(key):
    prop, _ = schema_leaves()[key]
    for kind, number in stated_bounds(LEAVES[key][1]):
        assert schema_bound(prop, kind) == number, f"params.yaml comment of {key}: {kind} {number}"


def test_the_page_shows_types_ranges_and_every_backbone_from_the_registry():
    page = params_doc.render()
    assert "| `model.image_size` | integer > 0, or null |" in page
    assert "| `augment.crop_scale` | list of 2, each number in (0, 1] |" in page
    for backbone in BACKBONES.values():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{backbone.name}` |"))
        assert f"| {backbone.native_size} / {backbone.min_size} |" in row
        assert all(str(alpha) in row for alpha in backbone.alphas)


def test_the_comment_parser_sees_missing_comments_choices_and_bounds():
    text = [
        "train:",
        "  # phase one",
        "  epochs: 10",
        "",
        "  batch_size: 32",
        "  split:  # fractions",
        "    val: 0.1",
        "  mode: a    # a | b (what b does)",
        "               # | c; at most 0.5",
    ]
    assert commented_leaves(text) == {
        "train.epochs": (True, ""),
        "train.batch_size": (False, ""),
        "train.split.val": (True, ""),
        "train.mode": (True, "a | b (what b does) | c; at most 0.5"),
    }
    assert listed_choices("a | b (what b does) | c; at most 0.5") == {"a", "b", "c"}
    assert stated_bounds("copies (0..100; at least 2)") == [("minimum", 2.0), ("minimum", 0.0), ("maximum", 100.0)]
