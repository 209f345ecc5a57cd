"""Tiny offline model kit: a small SDXL-architecture model, tokenizer and captioned dataset made locally."""
