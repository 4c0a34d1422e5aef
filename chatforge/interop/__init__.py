"""Bridges to other libraries' model classes (Hugging Face ``transformers``)."""

from chatforge.interop.hf import hf_config, to_hf

__all__ = ["hf_config", "to_hf"]
