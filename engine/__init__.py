"""INT8 Studio engine: checkpoints, INT8 quantization, kernels, models and jobs. Never imports Qt."""

__version__ = "0.1.0"
