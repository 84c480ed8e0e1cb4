"""Quantized checkpoints as they are stored: each quantized weight is a group of tensors (codes, scales, zero
points) that a codec turns into the float weight and back, tensor by tensor, without the format's library or
a model in memory. formats.json says which quant_method (and compressed-tensors format) each codec reads;
view.py shows the stream backend a checkpoint whose quantized weights are float tensors."""
