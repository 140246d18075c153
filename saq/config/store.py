"""Registers the schemas in Hydra's ConfigStore (named first in the defaults of conf/ptq.yaml,
conf/eval.yaml and conf/export.yaml)."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from saq.config.schema import EvalRunConfig, ExportRunConfig, PTQRunConfig

PTQ_SCHEMA = "ptq_schema"
EVAL_SCHEMA = "eval_schema"
EXPORT_SCHEMA = "export_schema"


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name=PTQ_SCHEMA, node=PTQRunConfig)
    store.store(name=EVAL_SCHEMA, node=EvalRunConfig)
    store.store(name=EXPORT_SCHEMA, node=ExportRunConfig)
