"""The core modules import each other bottom to top only: no back edges, no cycles."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_dhsa"
# Bottom to top; a module may import only modules of lower levels.
LEVELS = [
    ["device", "quantized", "plan"],
    ["config"],
    ["chunking"],
    ["cache"],
    ["quantized_cache"],
    ["selection"],
    ["scoring", "reference"],
    ["kernels.sources", "kernels.state"],
    ["kernels.checks"],
    ["kernels.attention", "kernels.planning"],
    ["kernels"],
    ["planners"],
    ["attention"],
    ["families", "pipelines"],
    ["patching"],
    ["loading"],
    ["distributed"],
]
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _file(module: str) -> Path:
    path = PACKAGE / (module.replace(".", "/") + ".py")
    return path if path.is_file() else PACKAGE / module.replace(".", "/") / "__init__.py"


def _core_imports(module: str) -> set[str]:
    """The core modules that ``module`` imports (relative imports resolved)."""
    parts = module.split(".")
    package = parts if _file(module).name == "__init__.py" else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(_file(module).read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            elif (node.module or "").startswith("mlx_dhsa"):
                target = node.module.removeprefix("mlx_dhsa").lstrip(".")
            else:
                continue
            names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
            if node.module:  # `from .x import y`: x itself (y may be a name in it)
                names.append(target)
        elif isinstance(node, ast.Import):
            names = [
                a.name.removeprefix("mlx_dhsa.")
                for a in node.names
                if a.name.startswith("mlx_dhsa.")
            ]
        else:
            continue
        found |= {n for n in names if n in LEVEL and n != module}
    return found


def test_core_imports_point_down():
    graph = {m: _core_imports(m) for m in LEVEL}
    back = [(m, d) for m, deps in graph.items() for d in deps if LEVEL[d] >= LEVEL[m]]
    assert not back, f"imports that point up or sideways: {back}"
    assert graph["config"] == {"device", "quantized"} and graph["device"] == set()
    assert "attention" not in graph["cache"] and "planners" not in graph["config"]
    assert graph["reference"] == {"plan", "quantized"}
