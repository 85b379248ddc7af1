"""`comfyui install-node`, `comfyui remove-node` and `comfyui node-status`: the ComfyUI node pack in an
install (:mod:`engine.node_pack`). Package installs into ComfyUI's Python print their exact command and
every line of its output as it comes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli.progress import ProgressBar
from engine.jobs import Progress


def add_actions(actions: argparse._SubParsersAction) -> None:
    """Add the node pack's actions to the ``comfyui`` command."""
    where = "the ComfyUI folder (default: the one found)"
    install = actions.add_parser(
        "install-node",
        help="install or update the INT8 Studio nodes in ComfyUI (custom_nodes/int8_studio)",
        description="Install or update the INT8 Studio nodes in ComfyUI's custom_nodes folder, and what they "
        "need in ComfyUI's Python (Triton) when it is missing. Restart ComfyUI afterwards.",
    )
    install.add_argument("--comfyui", type=Path, metavar="PATH", help=where)
    install.add_argument("--python", type=Path, metavar="PATH", help="ComfyUI's Python (default: found)")
    install.set_defaults(func=_run_install)
    remove = actions.add_parser(
        "remove-node", help="remove the INT8 Studio nodes from ComfyUI (only the folder INT8 Studio installed)"
    )
    remove.add_argument("--comfyui", type=Path, metavar="PATH", help=where)
    remove.set_defaults(func=_run_remove)
    status = actions.add_parser("node-status", help="whether the INT8 Studio nodes are installed and up to date")
    status.add_argument("--comfyui", type=Path, metavar="PATH", help=where)
    status.set_defaults(func=_run_status)


class _Streamed:
    """The progress bar, except that a package install's lines (its command first) are printed whole."""

    def __init__(self, bar: ProgressBar) -> None:
        self.bar = bar

    def __call__(self, p: Progress) -> None:
        from engine.node_pack import PACKAGES_STAGE

        if p.stage == PACKAGES_STAGE:
            if p.message:
                print(p.message, file=sys.stderr, flush=True)
            return
        self.bar(p)


def _install(args: argparse.Namespace):
    from engine.cli.comfyui import _choose_install

    return _choose_install(args.comfyui)


def _run_install(args: argparse.Namespace) -> int:
    from engine.node_pack import NodePackRequest, run_install_node

    request = NodePackRequest(_install(args), python=args.python)
    with ProgressBar() as bar:
        result = run_install_node(request, progress=_Streamed(bar))
    print(result.summary)
    return 0


def _run_remove(args: argparse.Namespace) -> int:
    from engine.node_pack import NodePackRequest, run_remove_node

    with ProgressBar() as bar:
        result = run_remove_node(NodePackRequest(_install(args)), progress=bar)
    print(result.summary)
    return 0


def _run_status(args: argparse.Namespace) -> int:
    from engine.node_pack_status import node_pack_status

    install = _install(args)
    status = node_pack_status(install)
    print(f"{status.summary} ({install.label})")
    return 0
