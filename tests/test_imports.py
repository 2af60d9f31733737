"""The house rules the package keeps: imports run one way (cli -> measure -> runtime -> fuse -> models -> layers,
with registry and checkpoint between), and importing edgevits runs no kernel probe."""
import ast
import subprocess
import sys
from pathlib import Path

import edgevits

ROOT = Path(edgevits.__file__).parent

# A module may import only modules of a lower rank (or its own subpackage). Rooms of one rank do not import each
# other. errors is at the bottom; testing (for tests and benchmarks) and the package's __init__ at the top.
RANKS = {
    "errors": 0, "version": 0, "layers": 1, "models": 2, "checkpoint": 3, "registry": 4, "fuse": 4,
    "runtime": 5, "measure": 6, "train": 6, "cli": 7, "testing": 8, "__init__": 9, "__main__": 9,
}


def _room(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0].removesuffix(".py")


def _imported_rooms(path: Path) -> set[str]:
    """The edgevits rooms a module imports (relative and absolute imports, at any depth in the file)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT).parent.parts
    rooms = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = list(base) + (node.module.split(".") if node.module else [])
                if not target:  # "from . import x" at the package root
                    target = [alias.name for alias in node.names]
                rooms.update(target[:1] if target else [])
            elif node.module and node.module.split(".")[0] == "edgevits":
                parts = node.module.split(".")[1:] or [alias.name for alias in node.names]
                rooms.add(parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("edgevits."):
                    rooms.add(alias.name.split(".")[1])
    return rooms


def test_imports_run_one_way():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        room = _room(path)
        for other in _imported_rooms(path) - {room}:
            assert other in RANKS, f"{path}: unknown room {other!r}"
            if RANKS[other] >= RANKS[room]:
                wrong.append(f"{path.relative_to(ROOT)} ({room}) imports {other}")
    assert not wrong, "imports against the direction:\n" + "\n".join(wrong)


def test_the_package_root_holds_at_most_six_modules():
    assert len([p for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]) <= 6


def test_importing_edgevits_runs_no_kernel_probe():
    code = ("import edgevits, edgevits.cli\n"
            "from edgevits.layers import kernels\n"
            "print(kernels.linear_probe.cache_info().currsize, kernels.conv_probe.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"]
