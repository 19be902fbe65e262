"""Configuration: the settings family (the only reader of the environment), key values, durations.

Layer 1: imports only :mod:`authnotify.errors`.
"""

from authnotify.config.needs import Need, check_needs
from authnotify.config.settings import (
    ENV_PREFIX,
    PROVIDERS,
    DevSettings,
    Provider,
    ProviderConfig,
    Settings,
    SimulateSettings,
    TokenKeys,
    load,
    load_settings,
)

__all__ = [
    "ENV_PREFIX",
    "Need",
    "check_needs",
    "PROVIDERS",
    "DevSettings",
    "Provider",
    "ProviderConfig",
    "Settings",
    "SimulateSettings",
    "TokenKeys",
    "load",
    "load_settings",
]
