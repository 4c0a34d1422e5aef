"""Bridges to other libraries' model classes (Hugging Face ``transformers``)."""

from chatforge.interop.hf import hf_config, to_hf
from chatforge.interop.hf_folder import CHAT_TEMPLATE, export_hf, import_hf

__all__ = ["CHAT_TEMPLATE", "export_hf", "hf_config", "import_hf", "to_hf"]
