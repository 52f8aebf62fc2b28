"""The README's Python example stays true to the API: its imports resolve and every call it
makes binds to the callable's signature (names and keyword arguments)."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _namespace(tree: ast.Module) -> dict:
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


def _resolve(func: ast.expr, names: dict):
    """The object a call's ``func`` names, or ``None`` where it is not from an import."""
    if isinstance(func, ast.Name):
        return names.get(func.id)
    if isinstance(func, ast.Attribute):
        owner = _resolve(func.value, names)
        return None if owner is None else getattr(owner, func.attr)
    return None


def test_readme_python_example_matches_the_api():
    blocks = [b for b in _python_blocks() if "sftkd_fastmri" in b]
    assert blocks, "the README has no Python example of the package"
    checked = []
    for block in blocks:
        tree = ast.parse(block)
        names = _namespace(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = _resolve(node.func, names)
            if func is None or not callable(func) or not inspect.getmodule(func):
                continue
            if not inspect.getmodule(func).__name__.startswith("sftkd_fastmri"):
                continue
            signature = inspect.signature(func)
            args = [None] * len(node.args)
            kwargs = {kw.arg: None for kw in node.keywords if kw.arg is not None}
            signature.bind(*args, **kwargs)  # TypeError names the argument that drifted
            checked.append(ast.unparse(node.func))
    # the example shows the main entry points; each of them must have been checked
    for name in ("StudentFriendlyTeacher", "SFTLoss", "DistillationCallback", "DCCNNModule"):
        assert any(name in c for c in checked), f"{name} call not found in the README"


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` runs the README's test command (plus only pytest's cache switch)."""
    readme = README.read_text()
    commands = re.findall(
        r"```bash\n(pip install -e \"\.\[test\]\" && (python -m pytest[^\n]*))\n", readme
    )
    assert commands, "the README shows no test command"
    ci = (README.parent / ".ci" / "run").read_text()
    ci_pytest = [line for line in ci.splitlines() if "pytest" in line and not line.startswith("#")]
    assert len(ci_pytest) == 1, ci_pytest
    for _, pytest_command in commands:
        expected = pytest_command.replace("python -m", "python3 -m") + " -p no:cacheprovider"
        assert ci_pytest[0].strip() == expected
