"""Settings for every part of convo (pydantic-settings). Never imports torch."""

from config.settings import Settings, load_settings

__all__ = ["Settings", "load_settings"]
