"""The engine the nodes import: the copy INT8 Studio installed with them, when there is one.

Installed by INT8 Studio (``int8-studio comfyui install-node``, or the app's Export page), the pack is
``custom_nodes/int8_studio/`` with a copy of INT8 Studio's engine in ``vendor/engine``: that folder goes
first on ``sys.path`` before any node module imports ``engine``. Only ``engine`` is there: INT8 Studio's
``app`` is never installed (ComfyUI has a top-level ``app`` package of its own). In INT8 Studio's own
repository there is no ``vendor/`` and the project's engine is imported as usual.

Standard library only: this runs before anything else of the pack.
"""

from __future__ import annotations

import logging
import os
import sys

VENDOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vendor")


def use_vendored_engine() -> None:
    """Put ``vendor/`` first on ``sys.path`` (installed pack only); refuse an ``engine`` of another
    package already imported, which the nodes would otherwise silently run on."""
    own = os.path.join(VENDOR, "engine")
    if not os.path.isdir(own):
        return
    loaded = sys.modules.get("engine")
    if loaded is not None:
        where = os.path.abspath(getattr(loaded, "__file__", None) or "?")
        if not where.startswith(own + os.sep):
            raise ImportError(
                f"INT8 Studio nodes: another package named 'engine' is already imported ({where}), "
                "probably by another custom node; the INT8 Studio nodes need their own (in "
                f"{own}). Disable that custom node or report the clash."
            )
        return
    if VENDOR not in sys.path:
        sys.path.insert(0, VENDOR)
    import engine

    logging.getLogger("int8_studio").info("INT8 Studio nodes v%s, engine from %s", engine.__version__, own)
