"""Knowledge of PEFT's on-disk adapter formats. No model code: files, dicts and tensors only."""
