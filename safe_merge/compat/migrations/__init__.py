"""Migration steps, each bridging one boundary between PEFT releases (or, for module renames, transformers
releases), run in this order: conversions first (so a converted key is neutral by the time keys are stripped),
then stripping, then the weight file format."""

from safe_merge.compat.migrations import (
    base_layer_naming,
    bin_to_safetensors,
    expert_stacks,
    explicit_targets,
    init_values,
    lora_b_layout,
    module_renames,
    patterns_fold,
    rslora_fold,
    safetensors_to_bin,
    stack_layout,
    strip_keys,
    target_parameters,
)

STEPS = (
    bin_to_safetensors,
    init_values,
    rslora_fold,  # before the pattern fold, which then reads alpha / r
    patterns_fold,
    target_parameters,
    base_layer_naming,
    module_renames,  # before explicit_targets, which names modules from the keys
    lora_b_layout,  # before stack_layout, which reads B in PEFT's packing
    stack_layout,  # before expert_stacks, which writes the target's layout itself
    expert_stacks,
    explicit_targets,
    strip_keys,
    safetensors_to_bin,
)
