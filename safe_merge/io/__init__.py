"""Files in and out: safetensors headers, one checkpoint reader that follows the index, one shard writer, the
staging directory that becomes OUT, and loading models through transformers and PEFT."""
