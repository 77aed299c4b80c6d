"""Hugging Face PEFT files: names, shapes and configs, export and import."""
