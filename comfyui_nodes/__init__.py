"""INT8 Studio's ComfyUI node pack: ComfyUI's own models, samplers and model management, with the int8
layers of INT8 files on INT8 Studio's engine (``engine.int8``). ComfyUI imports this package from
``custom_nodes/`` and reads the two mappings below; ComfyUI's own modules are imported only when a
node runs, so the package also imports outside ComfyUI."""

from .bootstrap import use_vendored_engine

use_vendored_engine()  # installed by INT8 Studio: the engine copied beside the nodes, before they import it

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
