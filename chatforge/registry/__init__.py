"""Model versions and aliases (``chatforge models``): see ``chatforge.registry.core``."""

from chatforge.registry.core import (
    CHALLENGER,
    CHAMPION,
    Registry,
    RegistryError,
    Version,
    parse_time,
    stage_record,
)

__all__ = ["CHALLENGER", "CHAMPION", "Registry", "RegistryError", "Version", "parse_time", "stage_record"]
