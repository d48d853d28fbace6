"""The package's layers run one way: core <- services <- commands <- scripts and benchmarks.

Every module's imports are read with `ast` (at the top and inside functions; imports under
`if TYPE_CHECKING:` are for annotations only and are left aside). A module may import its own
layer or a lower one, never a higher one; a command never imports another command (its parts,
such as its plots or its setup, belong to it and may import each other); and no import cycle runs
through the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "soft_prompt"
CORE, SERVICES, COMMANDS, SCRIPTS = range(4)
LAYER_NAMES = ("core", "services", "commands", "scripts")

LAYERS = {
    # core: the mechanism and what it stands on
    "__init__": CORE,
    "embedding": CORE,
    "loss": CORE,
    "weights": CORE,
    "masks": CORE,
    "templates": CORE,
    "files": CORE,
    "run_lock": CORE,
    "checkpoint": CORE,
    "prompt_cache": CORE,
    "generation": CORE,
    "scoring": CORE,
    "calibration": CORE,
    "calibrate_model": CORE,
    "reparam": CORE,
    "prefix_attention": CORE,
    "shared_prefix": CORE,
    "model": CORE,
    # services: what the commands share
    "data": SERVICES,
    "evaluation": SERVICES,
    "runtime": SERVICES,
    "bloom_sdpa": SERVICES,
    "distributed": SERVICES,
    "training_state": SERVICES,
    "config": SERVICES,
    "tiny": SERVICES,
    "chance": SERVICES,
    "probe": SERVICES,
    "serving": SERVICES,
    # commands: what the scripts run
    "training": COMMANDS,
    "training_setup": COMMANDS,
    "training_evaluation": COMMANDS,
    "ensemble_training": COMMANDS,
    "inference": COMMANDS,
    "analysis": COMMANDS,
    "analysis_plots": COMMANDS,
    "description": COMMANDS,
}
# A command's own helper modules, which only that command and its other parts import.
COMMAND_PARTS = {
    "analysis_plots": "analysis", "description": "analysis",
    "ensemble_training": "training", "training_setup": "training", "training_evaluation": "training",
}


def is_own_part(module: str, target: str) -> bool:
    """Whether command `target` is a part of command `module`, or of the command `module` is a part of."""
    owner = COMMAND_PARTS.get(target)
    return owner is not None and owner in (module, COMMAND_PARTS.get(module))


def is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, in_package: bool = True) -> tuple[set[str], set[str]]:
    """(the modules of `soft_prompt` that `source` imports, the other top-level names it imports).
    `soft_prompt.x` and `.x` both give "x", `from . import x` gives "x", `import soft_prompt` gives
    "__init__"; relative imports count only `in_package`."""
    ours: set[str] = set()
    others: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "soft_prompt":
                    ours.add(parts[1] if len(parts) > 1 else "__init__")
                else:
                    others.add(parts[0])
        elif isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".") if node.module else []
            relative = node.level > 0 and in_package
            if relative or parts[:1] == ["soft_prompt"]:
                parts = parts if relative else parts[1:]
                if parts:
                    ours.add(parts[0])
                else:  # from . import x, from soft_prompt import X
                    ours.update(a.name if (PACKAGE / f"{a.name}.py").is_file() else "__init__" for a in node.names)
            elif parts:
                others.add(parts[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return ours, others


def package_modules() -> dict[str, set[str]]:
    return {path.stem: imports_of(path.read_text())[0] for path in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    unplaced = sorted(set(package_modules()) - set(LAYERS))
    assert not unplaced, f"add these modules to LAYERS in tests/test_layers.py (and the README's table): {unplaced}"


def test_imports_run_from_higher_layers_to_lower_ones_only():
    wrong = []
    for module, imports in package_modules().items():
        layer = LAYERS.get(module)
        for target in imports:
            if target == module or target not in LAYERS or layer is None:
                continue
            if LAYERS[target] > layer:
                wrong.append(f"{module} ({LAYER_NAMES[layer]}) imports {target} ({LAYER_NAMES[LAYERS[target]]})")
            elif layer == COMMANDS and LAYERS[target] == COMMANDS and not is_own_part(module, target):
                wrong.append(f"command {module} imports command {target}")
    assert not wrong, "\n".join(wrong)


def test_a_command_imports_its_own_parts_only():
    assert is_own_part("training", "training_setup") and is_own_part("training_evaluation", "training_setup")
    assert is_own_part("analysis", "analysis_plots") and is_own_part("description", "analysis_plots")
    assert not is_own_part("inference", "training")  # two commands
    assert not is_own_part("training_setup", "analysis_plots")  # another command's part
    assert not is_own_part("training_setup", "training")  # a part does not import its command


def test_no_import_cycles():
    graph = {module: {t for t in imports if t != module and t != "__init__"} for module, imports in package_modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [module, target] if target in path else [module, target]
            if target not in state:
                found = cycle_from(target, path + [module])
                if found:
                    return found
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = cycle_from(module, [])
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_package_module_imports_a_script_or_a_benchmark():
    scripts = {path.stem for path in [*ROOT.glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]}
    wrong = {path.stem: imports_of(path.read_text())[1] & scripts for path in PACKAGE.glob("*.py")}
    assert not {module: names for module, names in wrong.items() if names}


def test_the_reader_sees_each_kind_of_import():
    """Imports at the top and inside functions, relative and absolute, are found; TYPE_CHECKING
    blocks are skipped: so a wrong import cannot slip past the checks above."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from .masks import IGNORE_INDEX\n"
        "import soft_prompt.templates\n"
        "from . import scoring\n"
        "from soft_prompt import SoftPromptModel\n"
        "import bench_train\n"
        "def f():\n    from soft_prompt.training import train\n"
        "if TYPE_CHECKING:\n    from .inference import run\n"
    )
    assert imports_of(source) == ({"masks", "templates", "scoring", "__init__", "training"}, {"typing", "bench_train"})


def test_the_readmes_module_table_shows_every_module_in_its_layer():
    """README.md's table of modules (| layer | `module.py`, ... | what it holds |) names each module
    of the package once, in the layer this file gives it."""
    shown = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in LAYER_NAMES[:SCRIPTS]:
            for name in cells[1].replace("`", "").split(","):
                shown[name.strip().removesuffix(".py")] = LAYER_NAMES.index(cells[0])
    expected = {module: layer for module, layer in LAYERS.items() if module != "__init__"}
    assert shown == expected
