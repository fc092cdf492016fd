"""The package's layers import downward only, and its top-level imports have no cycle (read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hf_fedkseed"

# Lowest first. A module may import its own layer and the layers below it, never one above.
LAYERS = [
    ("perturbation", ["perturbation", "version", "lazy"]),  # z(seed, name, index): engines, replay (pure torch)
    ("zo", ["zo"]),  # seed pool, sampler, two-point estimate
    ("trainer glue", ["forward_hooks"]),  # the hooks call the optimizer's pair API on an instance, not an import
    ("optimizer", ["optimizer"]),
    ("federated core", ["federated"]),  # config, schedule, rounds, server, client, wire, messages (no Trainer)
    ("recipe inputs", ["configs", "bases", "data", "build"]),  # what every runtime builds from a recipe
    ("runtimes", ["trainer_rounds", "callback", "flower", "baselines"]),
    ("product", ["evaluation", "reporting", "delta", "artifacts", "model_card", "hub", "pipeline", "cli"]),
    ("product", ["flower_run", "pretrain", "reference", "__init__"]),
]


def layer_of(module: str) -> int:
    """The layer index of `hf_fedkseed.<module>` (dotted, without the package name)."""
    top = module.split(".")[0]
    for index, (_, prefixes) in enumerate(LAYERS):
        if top in prefixes:
            return index if LAYERS[index][0] != "product" else len(LAYERS)
    raise AssertionError(f"hf_fedkseed.{module} is in no layer; add it to LAYERS")


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        found[name] = path
    return found


def imports_of(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """The hf_fedkseed modules `name` imports (relative imports resolved), at module level or anywhere."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "__init__":
        package = []
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports inside top-level `if` blocks (not TYPE_CHECKING) and `try`
        nodes = [n for n in tree.body if not (isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test))]
        nodes = [inner for n in nodes for inner in ast.walk(n) if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
                targets = [target] if node.module else [".".join([*base, alias.name]) for alias in node.names]
            elif node.module and node.module.startswith("hf_fedkseed"):
                targets = [node.module.removeprefix("hf_fedkseed").lstrip(".")]
            else:
                continue
            found.update(target for target in targets if target)
        elif isinstance(node, ast.Import):
            found.update(
                alias.name.removeprefix("hf_fedkseed.") for alias in node.names if alias.name.startswith("hf_fedkseed.")
            )
    known = modules()
    return {target if target in known else target.rsplit(".", 1)[0] for target in found} - {name}


def test_every_import_points_down_the_layers():
    upward = []
    for name, path in sorted(modules().items()):
        for target in sorted(imports_of(name, path, top_level_only=False)):
            if layer_of(target) > layer_of(name):
                upward.append(f"hf_fedkseed.{name} imports hf_fedkseed.{target}")
    assert upward == []


def test_flower_loads_neither_the_emulation_nor_the_pipeline():
    for name, path in modules().items():
        if name.startswith("flower"):
            reached = imports_of(name, path, top_level_only=False)
            assert not reached & {"callback", "pipeline"}, name


def test_the_module_level_imports_have_no_cycle():
    graph = {name: imports_of(name, path, top_level_only=True) for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, target]))
            if state.get(target) is None:
                visit(target, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if state.get(name) is None:
            visit(name, [])


def test_every_module_says_its_job_and_its_public_names_and_stays_short():
    for name, path in sorted(modules().items()):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        docstring = ast.get_docstring(tree)
        assert docstring, f"hf_fedkseed.{name} has no module docstring"
        targets = [
            target
            for node in tree.body
            for target in (node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)])
        ]
        assert any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets), f"hf_fedkseed.{name}: no __all__"
        assert len(source.splitlines()) <= 500, f"hf_fedkseed.{name} has {len(source.splitlines())} lines"
