"""The config schema (typed, with choices) and the checks run on a composed config."""

from saq.config.store import register_schemas
from saq.config.validate import ConfigError, validate_ptq_config

__all__ = ["ConfigError", "register_schemas", "validate_ptq_config"]
