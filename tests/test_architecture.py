"""The layers of docs/architecture.md: every module of mmfast/ and kernels/ imports only the
layers its row allows (parsed imports, module level and inside functions alike)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LAYER_OF = {"kernels": "kernels", "ops": "ops", "dispatch": "ops", "valuation": "ops", "_C": "native", "distributed": "distributed",
            "methods": "methods", "models": "models", "data": "data", "trainer": "run", "config": "run",
            "run_dir": "run", "checkpoints": "run", "steps": "run", "scratch": "run", "teachers": "run", "evaluation": "run", "plots": "run", "cli": "entry", "demo": "entry", "diagnose": "entry",
            "__main__": "entry", "diagnostics": "utilities", "cpu_memory": "utilities", "_cuda_arch": "build"}
ALLOWED = {
    "kernels": set(), "native": set(), "build": set(), "utilities": set(), "distributed": set(),
    "ops": {"kernels", "native"},
    "methods": {"ops", "distributed", "models"},  # (models: the fusion registry)
    "models": {"ops"},
    "data": {"distributed"},
    "run": {"ops", "distributed", "methods", "models", "data", "utilities"},
    "package": {"native", "ops", "methods", "utilities", "distributed", "build"},
    "entry": {"package", "kernels", "native", "ops", "distributed", "methods", "models", "data", "run", "utilities",
              "build"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if len(parts) == 1:
        return "package"
    assert parts[1] in LAYER_OF, f"{module}: a module with no layer: add it to docs/architecture.md and LAYER_OF"
    return LAYER_OF[parts[1]]


def imports(path: Path, module: str, package: str):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                if node.module:
                    yield ".".join(base + [node.module])
                else:
                    yield from (".".join(base + [alias.name]) for alias in node.names)
            elif node.module:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)


def modules():
    for top in ("mmfast", "kernels"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            package = module if parts[-1] == "__init__" else module.rsplit(".", 1)[0]
            yield path, module, package


def test_every_module_imports_only_the_layers_below_it():
    broken = []
    seen = 0
    for path, module, package in modules():
        mine = layer(module)
        for target in imports(path, module, package):
            if not target.startswith(("mmfast", "kernels")) or target in ("mmfast_config_for_docs",):
                continue
            theirs = layer(target)
            seen += 1
            if mine == "methods" and theirs == "models" and target != "mmfast.models.registry":
                broken.append(f"{path.relative_to(ROOT)} imports {target}: methods use only the fusion registry of models")
            if theirs != mine and theirs not in ALLOWED[mine]:
                broken.append(f"{path.relative_to(ROOT)} ({mine}) imports {target} ({theirs})")
    assert seen > 30  # (the parser found the project's imports)
    assert not broken, "\n".join(broken)


def test_the_layers_table_in_the_docs_names_every_package():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name in ("mmfast/ops/", "mmfast/methods/", "mmfast/models/", "mmfast/data/", "kernels/", "csrc/",
                 "mmfast/distributed.py", "mmfast/trainer.py", "mmfast/cli.py", "mmfast/diagnostics.py"):
        assert f"`{name}" in text, name
