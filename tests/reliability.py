"""What every case of the reliability corpus checks: the CLI's exact one-line message, its exit status,
no traceback, the inputs unchanged and nothing left behind."""

from __future__ import annotations

import hashlib
from pathlib import Path

from engine.cli import main


def digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) → its SHA-256."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(capsys, folder: Path, *argv: object, status: int = 2) -> str:
    """Run the CLI on inputs in ``folder``; assert it fails with one line, changing and leaving nothing
    there. Returns the message (after ``int8-studio: error: ``)."""
    before = digests(folder)
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert (code, out) == (status, ""), (code, out, err)
    assert err.startswith("int8-studio: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert digests(folder) == before  # inputs unchanged, no output, no temporary file
    return err.removeprefix("int8-studio: error: ").rstrip("\n")


def comfyui(root: Path) -> Path:
    """The least a folder needs to be a ComfyUI checkout to export into."""
    (root / "comfy").mkdir(parents=True)
    (root / "main.py").write_text("import folder_paths\n")
    (root / "folder_paths.py").write_text("")
    (root / "models" / "diffusion_models").mkdir(parents=True)
    return root
