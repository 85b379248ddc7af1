"""The package boundaries docs/DESIGN.md draws, checked on the source: what each package may import,
and that the app knows no model family by name."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engine.models import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


COMFYUI = ("comfy", "comfy_extras", "comfy_kitchen", "comfy_aimdo", "folder_paths", "comfyui_nodes")
"""ComfyUI's packages, and our node pack that runs inside it."""

FORBIDDEN = {
    "engine/models": ("engine.int8", "app", "PySide6", *COMFYUI),
    "engine": ("app", "PySide6", *COMFYUI),
    "app": COMFYUI,
    "comfyui_nodes": ("app", "PySide6"),
}
"""Package → the modules none of its files may import, with their submodules (``engine/models``: model
files are plain PyTorch; the engine never imports Qt; nothing but the node pack runs inside ComfyUI, and
the pack never imports our ``app``: ComfyUI has a top-level ``app`` package of its own)."""

EXCEPTIONS = {"engine/cli/desktop.py": {"app.__main__"}}
"""The console script opens the app when asked (a lazy import inside that one command)."""

SEAM = ("engine/fusion.py", "engine/heads.py")
"""The model↔int8 seam: plain PyTorch that both sides import, importing neither."""


def within(module: str, packages) -> bool:
    """``module`` is one of ``packages`` or inside one (``app.ui`` is in ``app``; ``appdirs`` is not)."""
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize("package", FORBIDDEN)
def test_packages_import_only_what_the_design_allows(package):
    for path in sources(package):
        allowed = EXCEPTIONS.get(str(path.relative_to(ROOT)), set())
        bad = {m for m in imported_modules(path) if within(m, FORBIDDEN[package]) and not within(m, allowed)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_checks_see_a_forbidden_import(tmp_path):
    """The import scan itself: a model file importing int8 code is caught, in either import form, and
    a module that only shares a prefix is not."""
    path = tmp_path / "model.py"
    path.write_text("import torch\nfrom engine.int8 import ops\nimport engine.int8.linear as l\nimport appdirs\n")
    found = imported_modules(path)
    assert {"engine.int8", "engine.int8.ops", "engine.int8.linear"} <= found
    assert within("engine.int8.ops", FORBIDDEN["engine/models"]) and not within("appdirs", ("app",))


@pytest.mark.parametrize("path", SEAM)
def test_the_seam_imports_neither_side(path):
    bad = {m for m in imported_modules(ROOT / path) if within(m, ("engine.int8", "engine.models"))}
    assert not bad, f"{path} imports {sorted(bad)}"


def test_inspect_and_convert_help_import_no_torch(tmp_path):
    """``inspect`` (header reading, detection, the architecture specs) and ``convert --help`` (the int8
    choices) run without torch, so they start in a fraction of a second (benchmarks/startup.py); each
    family's ``nn.Module`` is imported only when a model is built."""
    from tests.tiny_checkpoints import write_single_file

    path = write_single_file(tmp_path / "m.safetensors", "flux2", fmt="int8_rowwise").path
    code = (
        "import contextlib, io, sys\nfrom engine.cli import main\n"
        f"with contextlib.redirect_stdout(io.StringIO()) as out:\n    main(['inspect', {str(path)!r}])\n"
        "    with contextlib.suppress(SystemExit):\n        main(['convert', '--help'])\n"
        "print('torch' in sys.modules, 'Flux.2' in out.getvalue(), '--scheme' in out.getvalue())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.split() == ["False", "True", "True"], done.stdout + done.stderr


def family_words() -> set[str]:
    """What names a model family in text: every architecture's name and label, and its variants."""
    words = set()
    for arch in REGISTRY.values():
        words |= {arch.name, arch.label, *arch.variants}
    return {w for w in words if len(w) > 3}


def test_the_app_names_no_model_family():
    """Per-family knowledge lives on ``Architecture``; the app reads it from there (docstrings and
    comments may use a family as an example, code may not)."""
    words = family_words()
    assert {"flux2", "Flux.2", "zimage", "chroma"} <= words
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
    for path in sources("app"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree) if _has_docstring(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                found = pattern.search(node.value)
                assert not found, f"{path.relative_to(ROOT)}:{node.lineno} names {found.group()!r}: {node.value[:60]!r}"


def _has_docstring(node: ast.AST) -> bool:
    body = getattr(node, "body", None)
    return (
        isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and bool(body)
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    )
