"""Model versions and aliases (``chatforge models``): see ``chatforge.registry.core``."""

from chatforge.registry.core import (
    CHALLENGER,
    CHAMPION,
    Registry,
    RegistryError,
    Version,
    parse_time,
    registered_model_dir,
    stage_record,
)

__all__ = ["CHALLENGER", "CHAMPION", "Registry", "RegistryError", "Version", "parse_time", "registered_model_dir",
           "stage_record"]
