"""Interop: other tools' files (Meta .pth, Hugging Face safetensors, configs, tokenizers) to and from ours."""
