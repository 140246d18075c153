"""The task wrapper: a claimed run dir, status.json around a run, and the logger always closed.

A run owns its directory (an O_EXCL lock file while it runs), ends in a final state even when SLURM
or ``timeout`` sends SIGTERM (``interrupted``, with the command that resumes it), and run dirs get a
unique name even when two runs start in the same second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import yaml
from omegaconf import DictConfig, OmegaConf

from saq.utils.loggers import RunLogger, build_logger
from saq.utils.errors import SaqUserError
from saq.utils.run_files import format_error, write_bytes_atomic, write_status

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


def device_or_exit(cfg: DictConfig) -> None:
    """Stop with one line (no traceback) when ``runtime.device`` names a device this machine lacks."""
    from saq.ptq.pipeline import resolve_device

    try:
        resolve_device(str(cfg.runtime.device))
    except RuntimeError as exc:
        raise SystemExit(f"config error: {exc}") from None


class RunDirInUseError(SaqUserError, RuntimeError):
    """Another live run holds the run directory."""


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException, so that no ``except Exception`` in library code
    swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process killed by that signal


def project_root() -> str:
    """The directory holding conf/ (paths.root_dir)."""
    return str(Path(__file__).resolve().parents[2])


def config_dir() -> str:
    # Computed, not relative: Hydra resolves relative config paths inside the package under `python -m`.
    return str(Path(project_root()) / "conf")


def run_token() -> str:
    """pid + random: distinct for runs started in the same second, also on other nodes."""
    return f"{os.getpid()}-{secrets.token_hex(3)}"


def existing_file(path: str) -> str | None:
    """``path`` if it is a file, else None (a default that may be absent, e.g. the shared weights)."""
    return path if path and Path(path).expanduser().is_file() else None


def register_resolvers() -> None:
    """The project's OmegaConf resolvers and the config schema in Hydra's ConfigStore."""
    from saq.config import register_schemas

    register_schemas()
    if not OmegaConf.has_resolver("saq_root"):
        OmegaConf.register_new_resolver("saq_root", project_root)
    if not OmegaConf.has_resolver("saq_quant_label"):
        from saq.config.schema import quant_label

        OmegaConf.register_new_resolver("saq_quant_label", quant_label)
    if not OmegaConf.has_resolver("saq_run_id"):
        # Cached: one value per config, and Hydra copies the cache into every job of a sweep.
        OmegaConf.register_new_resolver("saq_run_id", run_token, use_cache=True)
    if not OmegaConf.has_resolver("saq_if_file"):
        OmegaConf.register_new_resolver("saq_if_file", existing_file)


# --- the run dir lock ------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner(lock: Path) -> dict[str, Any]:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}  # being written right now, or unreadable: treated as alive


def _is_stale(owner: dict[str, Any]) -> bool:
    """Only provable on this host: the owning process no longer exists."""
    return owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
        and not _pid_alive(owner["pid"])


def _remove_if_stale(lock: Path) -> bool:
    """Move a dead run's lock aside atomically (two claimants cannot both remove the same lock)."""
    aside = lock.with_name(f"{lock.name}.stale-{run_token()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True  # someone else removed it: try to claim again
    if _is_stale(_owner(aside)):
        log.warning("run dir %s: removed the lock of a run that no longer exists (%s)", lock.parent,
                    _owner(aside))
        aside.unlink(missing_ok=True)
        return True
    with contextlib.suppress(FileExistsError):  # not stale after all (a fresh claim): put it back
        os.link(aside, lock)
    aside.unlink(missing_ok=True)
    return False


def claim_run_dir(run_dir: Path) -> Path:
    """Create ``run_dir/run.lock`` with O_EXCL; raises RunDirInUseError while another run holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _is_stale(_owner(lock)) and _remove_if_stale(lock):
                continue
            raise RunDirInUseError(
                f"run dir {run_dir} is in use by another run ({_owner(lock) or 'unknown owner'}); leave "
                f"hydra.run.dir unset for a fresh dir, or delete {lock} if no run uses it any more") from None
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}, f)
        return lock
    raise RunDirInUseError(f"run dir {run_dir}: could not claim {lock}; delete it if no run uses it")


def release_run_dir(lock: Path) -> None:
    if _owner(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


def _hydra_files(run_dir: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (run_dir / ".hydra").glob("*.yaml")}


# The .hydra files of the last run that worked in a dir (copied when it ends). Hydra overwrites .hydra/
# before a run starts, so a rerun the dir refuses (its work was made under other settings) puts these
# back: the resume command printed by the earlier run still replays that run's settings.
RECORD_DIR = Path(".hydra") / "last_run"


def _record_hydra_files(run_dir: Path, files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        write_bytes_atomic(run_dir / RECORD_DIR / path.name, data)


def _recorded_hydra_files(run_dir: Path) -> dict[Path, bytes]:
    return {run_dir / ".hydra" / p.name: p.read_bytes() for p in (run_dir / RECORD_DIR).glob("*.yaml")}


def _restore_hydra_files(run_dir: Path, saved: dict[Path, bytes], whose: str = "this run's own") -> None:
    """Hydra writes .hydra/ before a run can claim its dir, so a run turned away from this dir may have
    overwritten them: put this run's own config back."""
    changed = [p for p, data in saved.items() if not p.is_file() or p.read_bytes() != data]
    for path in changed:
        write_bytes_atomic(path, saved[path])
    if changed:
        log.warning("run dir %s: %s overwritten; restored %s", run_dir, ", ".join(p.name for p in changed), whose)


# --- SIGTERM and resuming ---------------------------------------------------------------------------

INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGINT)
INTERRUPT_REPEAT_S = 2.0  # how often a swallowed interrupt is raised again


@contextlib.contextmanager
def interrupts_raise() -> Iterator[list[int]]:
    """Turn the first SIGTERM or SIGINT (Ctrl-C) into RunInterrupted in the main thread (later ones are
    ignored while the run writes its final status); the previous handlers are restored afterwards.

    SIGINT too, rather than Python's KeyboardInterrupt: Lightning turns a KeyboardInterrupt inside a
    fit into ``sys.exit(1)``, which would read as a cluster requeue. Yields the signals received: an
    exception raised inside a C extension's import turns RunInterrupted into an unrelated ImportError,
    so the run asks this list, not the exception type, whether it was interrupted."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if not received:
            received.append(signum)
            # Code that catches every exception (an import guard, a __del__) can swallow this one: raise
            # it again every few seconds until the run starts writing its final status.
            signal.setitimer(signal.ITIMER_REAL, INTERRUPT_REPEAT_S, INTERRUPT_REPEAT_S)
            raise RunInterrupted(signum)

    def repeat(signum: int, frame: Any) -> None:
        raise RunInterrupted(received[0])

    previous = {sig: signal.signal(sig, handler) for sig in INTERRUPTING_SIGNALS}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, repeat)
    try:
        yield received
    finally:
        stop_repeating_interrupt()
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_repeating_interrupt() -> None:
    """The run is writing its final status: no further RunInterrupted."""
    if threading.current_thread() is threading.main_thread():
        signal.setitimer(signal.ITIMER_REAL, 0)


def end_at_once_when_interrupted(main: Callable[[], Any]) -> None:
    """Run a command-line main; once an interrupted run has written its status and released its dir, its
    process ends without the interpreter's finalization. A run stopped at an arbitrary point (inside a C
    extension's import, a library's half-built state) can crash there with a fatal error and SIGABRT,
    which would hide the interrupt's exit code from a scheduler that requeues on it."""
    try:
        main()
    except SystemExit as exc:
        if exc.code not in {128 + int(sig) for sig in INTERRUPTING_SIGNALS}:
            raise
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exc.code)


def resume_command(cfg: DictConfig, run_dir: Path) -> str:
    """The command that continues this run in its own dir (reconstruction resumes from recon_state.pt)."""
    return f"python -m saq.{cfg.get('task_name', 'ptq')} resume={shlex.quote(str(run_dir))}"


def expand_resume(argv: list[str]) -> list[str]:
    """``resume=<run dir>`` -> that run's own overrides + ``hydra.run.dir=<run dir>`` (single-run mode);
    further overrides on the command line are appended."""
    given = [a for a in argv[1:] if a.startswith("resume=")]
    if not given:
        return argv
    run_dir = Path(given[-1].split("=", 1)[1]).expanduser()
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        raise SystemExit(f"resume={run_dir}: {overrides_file} not found; give the dir of an earlier run "
                         "(the one named in its status.json)")
    previous = [o for o in (yaml.safe_load(overrides_file.read_text()) or []) if not o.startswith("hydra.")]
    rest = [a for a in argv[1:] if not a.startswith("resume=") and a not in ("-m", "--multirun")]
    return [argv[0], *previous, *rest, f"hydra.run.dir={hydra_quote(str(run_dir))}", "hydra.mode=RUN"]


def hydra_quote(value: str) -> str:
    """``value`` as one quoted Hydra override value: spaces, commas (a sweep otherwise), brackets and
    non-ASCII characters (refused unquoted) are taken literally."""
    if "\\" in value:
        raise SystemExit(f"{value!r}: a backslash in a run dir cannot be passed to Hydra; rename the dir")
    return "'" + value.replace("'", "\\'") + "'"


# --- the task --------------------------------------------------------------------------------------

def _run_claimed(cfg: DictConfig, run_dir: Path, job: Callable[[DictConfig, Path, RunLogger], Any],
                 name: str, signals_received: list[int]) -> Any:
    write_status(run_dir, "running", pid=os.getpid())
    logger = None
    try:
        logger = build_logger(OmegaConf.to_container(cfg.logger, resolve=True, enum_to_str=True), run_dir,
                              OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), name)
        result = job(cfg, run_dir, logger)
    except (RunInterrupted, KeyboardInterrupt, SystemExit) as exc:
        if isinstance(exc, RunInterrupted):
            raise_interrupted(cfg, run_dir, logger, exc)
        if signals_received or isinstance(exc, KeyboardInterrupt):
            # Our signal surfaced as another exit (Lightning's sys.exit(1)), or a SIGINT outside our handler.
            signum = signals_received[0] if signals_received else signal.SIGINT
            raise_interrupted(cfg, run_dir, logger, RunInterrupted(signum), type(exc).__name__)
        # Any other SystemExit inside a job comes from a signal handler: submitit's on SIGUSR2 (SLURM
        # preemption or time limit), after it has requeued the job, which resumes in this dir; its exit
        # code is kept.
        mark_interrupted(cfg, run_dir, logger, f"exit {exc.code} requested while running (requeued by the cluster?)")
        raise
    except BaseException as exc:
        if signals_received:  # the signal surfaced as another exception (e.g. during an import)
            raise_interrupted(cfg, run_dir, logger, RunInterrupted(signals_received[0]), type(exc).__name__)
        write_status(run_dir, "failed", format_error(exc))
        if logger is not None:
            logger.finish(failed=True)
        if isinstance(exc, SaqUserError):  # its message names the problem and the fix: one line
            log.error("%s: %s", type(exc).__name__, exc)
            raise SystemExit(f"error: {exc}") from None
        raise
    stop_repeating_interrupt()  # a signal the job swallowed must not interrupt the writing of its results
    write_status(run_dir, "completed")
    logger.finish()
    return result


def mark_interrupted(cfg: DictConfig, run_dir: Path, logger: RunLogger | None, reason: str) -> None:
    command = resume_command(cfg, run_dir)
    write_status(run_dir, "interrupted", reason, resume=command)
    log.error("run interrupted (%s); status.json says interrupted. Resume it with: %s", reason, command)
    if logger is not None:
        logger.finish(failed=True)


def raise_interrupted(cfg: DictConfig, run_dir: Path, logger: RunLogger | None, interrupt: RunInterrupted,
                      surfaced_as: str | None = None) -> NoReturn:
    stop_repeating_interrupt()
    reason = f"RunInterrupted: {interrupt}" + (f" (surfaced as {surfaced_as})" if surfaced_as else "")
    mark_interrupted(cfg, run_dir, logger, reason)
    raise SystemExit(interrupt.exit_code) from None  # a clean exit, not a traceback


def job_of_a_sweep(body: Callable[[], float]) -> Callable[[], float]:
    """``body`` (a CLI main's work) as one job. A refusal is recorded in the run dir's status.json (one
    line) when the run had not written it yet (a config error, found after Hydra made the dir). In a
    multirun a failed job must not cost the others: the job returns NaN instead of raising, and the
    sweep's summary lists it and exits non-zero (saq.cli.callbacks). An interrupt (SIGTERM, Ctrl-C)
    stops a sweep too."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    def job() -> float:
        hydra_cfg = HydraConfig.get()
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        run_dir = Path(hydra_cfg.runtime.output_dir)
        try:
            return body()
        except SystemExit as exc:
            if not isinstance(exc.code, str):  # an interrupt's exit code, or submitit's requeue: stop here
                raise
            failure: BaseException = exc
            message = exc.code
        except Exception as exc:  # noqa: BLE001 - recorded below; a sweep goes on
            if not sweep:
                raise
            failure, message = exc, f"{type(exc).__name__}: {exc}"
        if not (run_dir / "status.json").is_file():  # refused before run_task wrote one (a config error);
            write_status(run_dir, "failed", message)  # an existing one is this run's, or another live run's
        if not sweep:
            raise failure
        log.error("job %s failed: %s", run_dir.name, message.strip().splitlines()[0] if message.strip() else "")
        return float("nan")

    return job


def run_task(cfg: DictConfig, run_dir: Path, job: Callable[[DictConfig, Path, RunLogger], Any], name: str) -> Any:
    try:
        lock = claim_run_dir(run_dir)  # before status.json: a second run must not overwrite the first's
    except RunDirInUseError as exc:
        log.error("%s: %s", type(exc).__name__, exc)
        raise SystemExit(f"error: {exc}") from None
    saved, whose = _hydra_files(run_dir), "this run's own"
    try:
        with interrupts_raise() as signals_received:
            return _run_claimed(cfg, run_dir, job, name, signals_received)
    except BaseException as exc:
        from saq.config.validate import RunDirHoldsOtherSettingsError

        if isinstance(exc.__context__ or exc, RunDirHoldsOtherSettingsError) and _recorded_hydra_files(run_dir):
            # refused: the dir keeps the earlier run's settings
            saved, whose = _recorded_hydra_files(run_dir), "the earlier run's (this run was refused)"
        raise
    finally:
        _restore_hydra_files(run_dir, saved, whose)
        _record_hydra_files(run_dir, saved)
        release_run_dir(lock)


__all__ = ["RunDirInUseError", "RunInterrupted", "claim_run_dir", "config_dir", "end_at_once_when_interrupted",
           "expand_resume", "project_root", "register_resolvers", "release_run_dir", "resume_command", "run_task"]
