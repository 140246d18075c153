"""The task wrapper: status.json around a run, and the logger always closed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from saq.utils.loggers import RunLogger, build_logger
from saq.utils.run_files import format_error, write_status


def project_root() -> str:
    """The directory holding conf/ (paths.root_dir)."""
    return str(Path(__file__).resolve().parents[2])


def config_dir() -> str:
    # Computed, not relative: Hydra resolves relative config paths inside the package under `python -m`.
    return str(Path(project_root()) / "conf")


def register_resolvers() -> None:
    """The project's OmegaConf resolvers and the config schema in Hydra's ConfigStore."""
    from saq.config import register_schemas

    register_schemas()
    if not OmegaConf.has_resolver("saq_root"):
        OmegaConf.register_new_resolver("saq_root", project_root)
    if not OmegaConf.has_resolver("saq_quant_label"):
        from saq.config.schema import quant_label

        OmegaConf.register_new_resolver("saq_quant_label", quant_label)


def run_task(cfg: DictConfig, run_dir: Path, job: Callable[[DictConfig, Path, RunLogger], Any], name: str) -> Any:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_status(run_dir, "running")
    logger = None
    try:
        logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True, enum_to_str=True), run_dir,
                              OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), name)
        result = job(cfg, run_dir, logger)
    except BaseException as exc:
        write_status(run_dir, "failed", format_error(exc))
        if logger is not None:
            logger.finish(failed=True)
        raise
    write_status(run_dir, "completed")
    logger.finish()
    return result
