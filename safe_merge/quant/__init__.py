"""Quantized bases as data: which method and bits a config declares, which loaded layers are quantized, the float
twin of a quantized model, and the rounding grid each method puts weights on."""
