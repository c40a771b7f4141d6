"""Strict YAML for recipes: ``yaml.safe_load`` plus two refusals.

- A mapping that gives the same key twice is an error naming the key and both lines, not a
  silent "the last one wins".
- Aliases may not blow the document up: the document's size with every alias expanded is
  counted on the composed node graph (linear in the file, whatever the aliases do) before any
  Python object is built, and a document past :data:`MAX_VALUES` values (a "billion laughs"
  file) is refused at once. Recursive aliases are refused too.

The C loader is used when PyYAML has it (parsing is then about four times faster).
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, SequenceNode

from compress.errors import RecipeError

MAX_VALUES = 1_000_000
"""Most values (mappings, sequences, scalars; keys not counted) a document may hold once its
aliases are expanded: 20,000 variants take about 150,000."""

MERGE_TAG = "tag:yaml.org,2002:merge"

_Base: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class StrictLoader(_Base):  # type: ignore[misc, valid-type]
    """``SafeLoader`` that raises on duplicate mapping keys (``<<`` merges may still override)."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {first})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def expanded_size(root: Node, limit: int = MAX_VALUES) -> int:
    """Number of values under ``root`` with every alias expanded, computed once per node
    (aliases share their node) and without recursion; stops counting above ``limit``.

    Raises ``ValueError`` for a recursive alias (a node that contains itself)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        nid = id(node)
        if children_done:
            total = 1 + sum(sizes[id(c)] for c in _children(node))
            sizes[nid] = min(total, limit + 1)
            on_path.discard(nid)
            continue
        if nid in sizes:
            continue
        if nid in on_path:
            raise ValueError("a recursive alias (a node that contains itself)")
        on_path.add(nid)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise ValueError("a recursive alias (a node that contains itself)")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [v for _, v in node.value]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def load_yaml(text: str, file: str) -> Any:
    """The document in ``text`` as Python data; any problem is a :class:`RecipeError` naming
    ``file`` and, where known, the line and column."""
    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:  # without an alias ("*name") the size is that of the file: nothing to count
            size = expanded_size(node) if "*" in text else 0
        except ValueError as exc:
            raise RecipeError(file, "", f"invalid YAML: {exc}") from None
        if size > MAX_VALUES:
            raise RecipeError(
                file,
                "",
                f"invalid YAML: its aliases expand it past {MAX_VALUES:,} values "
                "(a recipe needs far fewer; write the repeated parts out or share fewer)",
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(file, "", f"invalid YAML: {where}{problem}") from None
    except RecursionError:
        raise RecipeError(file, "", "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()
