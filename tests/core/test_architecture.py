"""The layers of the package as the README's Architecture table states them: each subpackage imports only from the
layers below it (read from the source, imports inside functions included), and `import hf_l2` loads no tool."""

import ast
import json
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hf_l2"
# What each layer may not import; the core is every top-level module but `trainers.py`, which assembles the core's
# Trainer layer with publishing into the classes users import.
FORBIDDEN = {
    "core": ("hf_l2.publishing", "hf_l2.integrations", "hf_l2.tools", "hf_l2.trainers"),
    "trainers": ("hf_l2.integrations", "hf_l2.tools"),
    "publishing": ("hf_l2.integrations", "hf_l2.tools", "hf_l2.trainers"),
    "integrations": ("hf_l2.tools",),
    "tools": (),
}


def layer(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    if len(relative.parts) > 1:
        return relative.parts[0]
    return "trainers" if relative.name in ("trainers.py", "__init__.py") else "core"


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (the package imports by absolute names)"
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def test_every_layer_imports_only_from_the_layers_below_it():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert {layer(m) for m in modules} == set(FORBIDDEN), "every layer has modules, and no other layer exists"
    wrong = [f"{m.relative_to(PACKAGE)} imports {name}" for m in modules for name in imported_modules(m)
             if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[layer(m)])]
    assert not wrong


def test_an_import_inside_a_function_is_read(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from hf_l2.tools.cli import main\n")
    assert "hf_l2.tools.cli" in imported_modules(module)


def test_importing_the_core_loads_no_tool_and_no_tool_dependency():
    code = "import sys, json, hf_l2; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout)
    assert not [m for m in loaded if m.startswith(("hf_l2.tools", "hf_l2.integrations"))]
    assert not {"evaluate", "matplotlib", "sacrebleu"} & set(loaded)
