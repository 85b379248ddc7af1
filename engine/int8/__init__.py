"""INT8 W8A8: int8 weights with float scales, per-token int8 activations, Triton kernels that fuse the
dequantization (and more) into the GEMM, and ``Int8Linear``, the layer that runs them.

Glossary: one word per concept, in names and docstrings alike.

token
    A row of a layer's input: [..., K] flattened to [tokens, K] (M in the GEMM). Activations are quantized
    per token (``quantize_tokens``, scales ``x_scale`` [M]).
channel
    An output feature of a weight [N, K] (N output channels, K input channels). ``Int8Linear.int8_weight``
    slices channels; a per-channel scale has one value per output channel.
rowwise, tensorwise
    Only the file format's scheme names (one scale per output channel, or one for the tensor), which are
    in users' files (``quantize.Scheme``).
Int8Weight
    An int8 weight [N, K] with its scale and bias (``operands.Int8Weight``): what a GEMM multiplies.
gate, up
    SwiGLU(x) = silu(x · W_gateᵀ) · (x · W_upᵀ), then the down-projection (LLaMA / diffusers naming): the
    gate is the product that goes through silu, up the other one. ``ops.int8_swiglu(x, gate, up)`` runs
    both in one gated GEMM; a fused in-projection holds the gate's channels first. A LoRA's ``down`` and
    ``up`` are its own two factors (``LoraFactors``, ``LowRank``), always named with the LoRA.
epilogue
    What the GEMM computes after the int8 product, in the same kernel: the dequantization, then a bias, a
    low-rank (dynamic LoRA) term, the gated product or attention's heads (``operands.Epilogue``).
ActivatedInput, NormedInput
    A layer input declared before its activation or before its norm and modulation (:mod:`engine.fusion`);
    the quantization kernels apply either on the way in. ``operands.SampleNorm`` is a NormedInput's norm in
    the form the kernel reads.
heads
    Attention's inputs q, k, v from a fused q|k|v projection (``engine.fusion.Heads``). The GEMM's heads
    epilogue normalizes and rotates them on the way out (``operands.QKNormTables``: a
    ``QKNormRope`` in the form the kernel reads).
backend
    Where the ops run: ``"triton"``, ``"int_mm"`` or ``"torch"`` (:mod:`engine.int8.backends`).

Modules: ``quantize`` (weights), ``rotation`` (Hadamard rotation), ``operands`` (what the kernels take),
``kernels/`` (Triton), ``backends`` (the choice and the fallbacks), ``ops`` (``int8_linear`` and the
registered ``int8_studio::*`` ops), ``attention`` (``int8_attention``: attention with an int8 ``Q Kᵀ``),
``linear`` (``Int8Linear``), ``apply`` (int8 layers into a model), ``graph_fusion`` (an inductor pass that
fuses around the ops in compiled graphs of model code that is not ours: ComfyUI's) with ``graph_patterns``
(what that graph's nodes compute).
"""
