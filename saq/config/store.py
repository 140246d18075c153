"""Registers the schema in Hydra's ConfigStore (named first in conf/ptq.yaml's defaults)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from saq.config.schema import PTQRunConfig

PTQ_SCHEMA = "ptq_schema"


def register_schemas() -> None:
    ConfigStore.instance().store(name=PTQ_SCHEMA, node=PTQRunConfig)
