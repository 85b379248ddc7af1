"""INT8 W8A8: weight quantization, Triton kernels, the int8_linear op and Int8Linear."""
