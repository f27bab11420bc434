"""Model loading (hub id, folder, single file), random-weight builders and tokenizer tools."""
