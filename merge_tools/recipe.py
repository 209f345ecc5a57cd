"""Merge recipes: a tree of method nodes over model files, parsed once from TOML (or built by the CLI).

TOML format (see examples/merge_*.toml)::

    [models]                      # name = path (relative paths are relative to the recipe file)
    base = "sdxl_base.safetensors"
    a = "a.safetensors"
    b = "b.safetensors"

    [nodes.tied]                  # a node: method + inputs + parameters
    method = "ties"
    inputs = ["base", "a", "b"]   # model names, node names, or inline tables {method=…, inputs=[…]}
    k = 0.2

    [nodes.final]
    method = "add_difference"
    inputs = ["a", "tied", "base"]
    alpha = [0.0, 0.5, …]         # a list (block order) or {BASE = 0.2, IN00 = 0.5, …} = MBW weights

    [output]
    node = "final"                # default: the one node no other node uses
    dtype = "fp16"                # optional defaults for the CLI flags: dtype, compute_dtype, seed
    seed = 0

Unknown tables, keys or parameters are errors that name the file and place.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_tools import methods


class RecipeError(ValueError):
    """A recipe cannot be used as written; the message names the file and the place."""


@dataclass(frozen=True)
class ModelRef:
    """A model file. `derive` = ("rebasin", A, B, params): the file is B aligned to A, made before merging."""

    name: str
    path: Path
    derive: tuple[str, ModelRef, ModelRef, dict[str, Any]] | None = field(default=None, compare=False, hash=False)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name}


@dataclass(frozen=True, eq=False)
class Node:
    method: str
    inputs: tuple[Node | ModelRef, ...]
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        spec = methods.get(self.method)
        object.__setattr__(self, "method", spec.name)
        spec.check_inputs(len(self.inputs))
        spec.resolve_params(self.params)

    @property
    def spec(self) -> methods.MethodSpec:
        return methods.get(self.method)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "inputs": [i.describe() for i in self.inputs]}

    def models(self) -> list[ModelRef]:
        """Distinct model files under this node, first-use order."""
        seen: dict[Path, ModelRef] = {}
        for i in self.inputs:
            for m in [i] if isinstance(i, ModelRef) else i.models():
                seen.setdefault(m.path.resolve(), m)
        return list(seen.values())

    def nodes(self) -> list[Node]:
        out: list[Node] = [self]
        for i in self.inputs:
            if isinstance(i, Node):
                out.extend(i.nodes())
        return out


def canonical_json(node: Node) -> str:
    return json.dumps(node.describe(), sort_keys=True, separators=(",", ":"))


@dataclass
class Recipe:
    root: Node
    defaults: dict[str, Any]
    source: str  # where it came from (file path or "cli")


_OUTPUT_KEYS = {"node", "dtype", "compute_dtype", "seed"}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise RecipeError(f"{path}: recipe file not found") from e
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML ({e})") from e
    return parse_recipe(data, base_dir=path.parent, source=str(path))


def parse_recipe(data: Mapping[str, Any], base_dir: Path, source: str = "recipe") -> Recipe:
    unknown = sorted(set(data) - {"models", "nodes", "output"})
    if unknown:
        raise RecipeError(f"{source}: unknown table(s) {unknown}; a recipe has [models], [nodes.*], [output]")
    models_tbl = data.get("models") or {}
    nodes_tbl = data.get("nodes") or {}
    output = dict(data.get("output") or {})
    if not models_tbl:
        raise RecipeError(f'{source}: [models] is empty; list name = "path.safetensors" entries')
    if not nodes_tbl:
        raise RecipeError(f"{source}: no [nodes.<name>] table; add at least one node with method and inputs")
    bad_out = sorted(set(output) - _OUTPUT_KEYS)
    if bad_out:
        raise RecipeError(f"{source}: [output] has unknown key(s) {bad_out}; allowed: {sorted(_OUTPUT_KEYS)}")
    clash = sorted(set(models_tbl) & set(nodes_tbl))
    if clash:
        raise RecipeError(f"{source}: name(s) {clash} are both a model and a node; rename one")

    models: dict[str, ModelRef] = {}
    for name, p in models_tbl.items():
        if not isinstance(p, str):
            raise RecipeError(f"{source}: [models] {name} must be a path string")
        mp = Path(p).expanduser()
        models[name] = ModelRef(name, mp if mp.is_absolute() else base_dir / mp)

    built: dict[str, Node | ModelRef] = {}
    building: list[str] = []
    used: set[str] = set()

    def build(table: Mapping[str, Any], where: str) -> Node | ModelRef:
        if "method" not in table:
            raise RecipeError(f"{source}: {where} has no 'method'")
        if "inputs" not in table or not isinstance(table["inputs"], list):
            raise RecipeError(f"{source}: {where} needs 'inputs = [...]' (model or node names)")
        inputs = [resolve(x, f"{where}.inputs[{i}]") for i, x in enumerate(table["inputs"])]
        params = {k: v for k, v in table.items() if k not in ("method", "inputs")}
        if str(table["method"]) == "rebasin":
            return rebasin_ref(inputs, params, where)
        try:
            return Node(str(table["method"]), tuple(inputs), params, name=where)
        except (KeyError, ValueError) as e:
            msg = e.args[0] if e.args else str(e)
            raise RecipeError(f"{source}: {where}: {msg}") from e

    def rebasin_ref(inputs: list[Node | ModelRef], params: dict[str, Any], where: str) -> ModelRef:
        from merge_tools.rebasin import REBASIN_PARAMS, aligned_cache_path

        if len(inputs) != 2 or not all(isinstance(i, ModelRef) and i.derive is None for i in inputs):
            raise RecipeError(f"{source}: {where}: rebasin takes two model files, inputs = [reference, model]")
        unknown = sorted(set(params) - set(REBASIN_PARAMS))
        if unknown:
            raise RecipeError(f"{source}: {where}: rebasin has no parameter(s) {unknown}; it takes {REBASIN_PARAMS}")
        a, b = inputs
        assert isinstance(a, ModelRef) and isinstance(b, ModelRef)
        return ModelRef(where, aligned_cache_path(a.path, b.path, params), ("rebasin", a, b, dict(params)))

    def resolve(x: Any, where: str) -> Node | ModelRef:
        if isinstance(x, Mapping):
            return build(x, where)
        if not isinstance(x, str):
            raise RecipeError(f"{source}: {where} must be a model name, node name or inline table")
        if x in models:
            return models[x]
        if x in nodes_tbl:
            used.add(x)
            return node(x)
        raise RecipeError(f"{source}: {where} refers to {x!r}, which is neither in [models] nor a [nodes.{x}]")

    def node(name: str) -> Node | ModelRef:
        if name in built:
            return built[name]
        if name in building:
            raise RecipeError(f"{source}: nodes form a cycle: {' -> '.join([*building, name])}")
        building.append(name)
        tbl = nodes_tbl[name]
        if not isinstance(tbl, Mapping):
            raise RecipeError(f"{source}: nodes.{name} must be a table")
        built[name] = build(tbl, f"nodes.{name}")
        building.pop()
        return built[name]

    for name in nodes_tbl:
        node(name)
    root_name = output.pop("node", None)
    if root_name is None:
        roots = [n for n in nodes_tbl if n not in used]
        if len(roots) != 1:
            raise RecipeError(f'{source}: cannot tell the final node among {roots}; set [output] node = "..."')
        root_name = roots[0]
    if root_name not in built:
        raise RecipeError(f"{source}: [output] node = {root_name!r} is not a [nodes.*] table")
    root = built[root_name]
    if not isinstance(root, Node):
        raise RecipeError(f"{source}: the final node {root_name!r} must be a merge method (rebasin only aligns)")
    return Recipe(root, output, source)


def single_method(method: str, inputs: list[str | Path], params: dict[str, Any]) -> Recipe:
    """The recipe for a CLI shortcut: one method over model files (names are the file stems)."""
    refs = []
    for i, p in enumerate(inputs):
        path = Path(p)
        refs.append(ModelRef(f"m{i}:{path.name}", path))
    try:
        root = Node(method, tuple(refs), params, name=method)
    except (KeyError, ValueError) as e:
        raise RecipeError(e.args[0] if e.args else str(e)) from e
    return Recipe(root, {}, "cli")
