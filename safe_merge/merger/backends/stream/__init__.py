"""The stream backend: merge tensor by tensor from the base's shards into new shards, without building the model.

A LoRA merge touches each targeted weight alone (W' = W + s·B·A, or DoRA's rescaled form), so it never needs the
whole model in memory: peak memory follows the largest tensor, not the model's size. backend.py is what the
pipeline sees; write.py reads, merges (arith.py, PEFT's arithmetic) and writes; verify.py checks each tensor as it
is written and the checkpoint as a whole.
"""
