"""Stage 3, adapters: adapter trees, their variants (DoRA, QLoRA bases, banks), merging and sharding."""
