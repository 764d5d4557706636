"""The apps' command-line edge: one-line errors, no folder left by a failed call, experiments kept to their app.

    if __name__ == "__main__":
        run_app(main, __file__)          # train.py, sample.py, evaluate.py, evaluate_estimators.py

An error of a known kind prints ``error: <message>``, for an error of the project's own classes the indented lines
that follow its message's first line (what differs, key by key; at most a screenful), and at most one ``hint: <what
to do>`` line on stderr, and exits with status 1. Known kinds are the ones raised on purpose with a message for the
user: ``ValueError`` (bad settings, unreadable files), ``OSError`` (missing files), every exception class the
project defines (a refused run folder, a diverged loss, unavailable Inception weights, a failed sweep, ...), and
Hydra's and OmegaConf's errors of a config that does not compose (a typed setting of the wrong type, an unknown
config). Anything else is a bug and keeps its traceback; ``HYDRA_FULL_ERROR=1`` keeps every traceback. An
exception's first note (``error.add_note(...)``) is its hint. A key that does not exist gets the config's closest
real keys as its hint (:func:`key_hint`); a folder Hydra cannot create names the setting that chose it
(:func:`output_folder_error`).

Two pieces, because Hydra reports errors in two places: :func:`run_app` wraps the whole app (a config that does not
compose, an experiment of another app, a sweep that is refused or fails), and :func:`one_line_errors` wraps the
task inside ``@hydra.main`` (Hydra would otherwise print its own line before the task's exception reaches the
app). So that Hydra hands exceptions over instead of printing them, :func:`run_app` sets ``HYDRA_FULL_ERROR=1``
for the process and marks that it did (``KNN_CM_SHORT_ERRORS``, inherited by the processes a launcher starts,
which then still print one line).
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import CompactHydraException, InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

FULL_ERROR = "HYDRA_FULL_ERROR"
SHORT_ERRORS = "KNN_CM_SHORT_ERRORS"  # set by the edge, not by the user: HYDRA_FULL_ERROR=1 is the edge's own
KNOWN_ERRORS = (ValueError, OSError, CompactHydraException, OmegaConfBaseException)
# Each app and its config folder under configs/ (its primary config is configs/<folder>/<folder>.yaml; its own
# groups, its experiments above all, sit beside it; configs/common holds the groups every app shares).
APPS = {"train.py": "train", "sample.py": "sample", "evaluate.py": "evaluate",
        "evaluate_estimators.py": "estimator_study"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the checkout's configs/, beside knn_cm/
SCREEN = 20  # the most detail lines an error prints (a screenful); the rest are counted
# The settings that choose an app's output folder, as a command line may give them.
OUTPUT_SETTINGS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "output_root", "run_name")


def compose_app(app: str, overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
    """``app``'s config (``"train.py"`` or its folder name ``"train"``) composed in-process with ``overrides``, as
    the app would compose it (campaign planning, tests); the folder comes from :data:`APPS`."""
    from hydra import compose, initialize_config_dir

    folder = APPS.get(app, app)
    if folder not in APPS.values():
        raise ValueError(f"app={app!r} is not one of {', '.join(APPS)}")
    with initialize_config_dir(config_dir=str(CONFIGS / folder), version_base="1.3"):
        return compose(config_name=folder, overrides=list(overrides), return_hydra_config=return_hydra_config)


def _ours(error: BaseException) -> bool:
    """Whether ``error``'s class is one the project defines."""
    module = type(error).__module__
    return module.split(".")[0] == "knn_cm" or module.startswith("hydra_plugins.knn_cm")


def is_known(error: BaseException) -> bool:
    """Whether ``error`` was raised on purpose with a message for the user (the module docstring)."""
    return isinstance(error, KNOWN_ERRORS) or _ours(error)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def describe(error: BaseException) -> tuple[str, str | None]:
    """(the one-line message, a hint or None) for a known error."""
    notes = getattr(error, "__notes__", None) or []
    hint = _first_line(notes[0]) if notes else None
    cause = error.__cause__
    if isinstance(error, MissingConfigException) and error.options:
        return _first_line(error), hint or f"available: {', '.join(sorted(error.options))}"
    if isinstance(error, InstantiationException) and cause is not None:
        key = next((line.split(":", 1)[1].strip() for line in str(error).splitlines() if "full_key:" in line), None)
        message, cause_hint = describe(cause)
        return (f"{key}: {message}" if key else message), hint or cause_hint
    if isinstance(error, CompactHydraException) and isinstance(cause, OmegaConfBaseException):
        key = getattr(cause, "full_key", None)  # a typed setting refused while the override was merged
        return f"{key or _first_line(error)}: {_first_line(cause)}", hint
    if isinstance(error, OmegaConfBaseException) and getattr(error, "full_key", None):
        return f"{error.full_key}: {_first_line(error)}", hint
    return _first_line(error) or type(error).__name__, hint


def details(error: BaseException) -> list[str]:
    """The indented lines that follow the first line of an error of the project's own classes (what differs, key by
    key), at most :data:`SCREEN` of them, the rest counted; none for other errors."""
    if not _ours(error):
        return []
    lines = [line for line in str(error).splitlines() if line.strip()][1:]
    indented = []
    for line in lines:
        if not line.startswith((" ", "\t")):
            break
        indented.append(line.rstrip())
    if len(indented) > SCREEN:
        indented = indented[: SCREEN - 1] + [f"  ... and {len(indented) - SCREEN + 1} more"]
    return indented


def report(error: BaseException, stream=None) -> None:
    """Write ``error: <message>``, its detail lines (:func:`details`) and ``hint: ...`` to ``stream`` (stderr)."""
    stream = stream or sys.stderr
    message, hint = describe(error)
    lines = [f"error: {message}", *details(error)] + ([f"hint: {hint}"] if hint else [])
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def tracebacks_wanted() -> bool:
    """Whether the user asked for full tracebacks (HYDRA_FULL_ERROR=1 set by them, not by the edge)."""
    return os.environ.get(FULL_ERROR) == "1" and os.environ.get(SHORT_ERRORS) != "1"


def run_app(main: Callable[[], object], app_file: str, argv: list[str] | None = None) -> None:
    """Run an app's ``@hydra.main`` function with the edge's error handling (the module docstring)."""
    app_file = Path(app_file)
    argv = sys.argv[1:] if argv is None else argv
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build faiss loaded is no news to a user
    if tracebacks_wanted():
        check_experiment_app(app_file.name, CONFIGS, argv)
        main()
        return
    os.environ[FULL_ERROR] = os.environ[SHORT_ERRORS] = "1"
    try:
        check_experiment_app(app_file.name, CONFIGS, argv)
        main()
    except Exception as error:
        if not is_known(error):
            raise
        report(restated(error, app_file.name, argv))
        sys.exit(1)


def restated(error: BaseException, app: str, argv: Sequence[str]) -> BaseException:
    """``error`` in the user's terms where the edge knows more than the error: a key that does not exist with the
    closest real keys as its hint, a folder Hydra could not create with the setting that chose it."""
    key = unknown_key(error)
    if key is not None:
        refusal = ValueError(f"{key} is not a setting of {app}")
        refusal.add_note(key_hint(app, key, argv))
        return refusal
    return output_folder_error(error, argv) or error


# ------------------------------------------------------------------------------------------------ unknown keys
def unknown_key(error: BaseException) -> str | None:
    """The full key of an override that names no setting (Hydra's "Could not override 'trainer.lr'"), else None."""
    cause = error.__cause__
    if isinstance(error, CompactHydraException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        if str(error).startswith("Could not override"):
            return getattr(cause, "full_key", None) or str(error).split("'")[1]
    return None


def config_keys(app: str, overrides: Sequence[str] = ()) -> list[str]:
    """The settings of ``app``'s composed config as full keys (``trainer.optimizer.lr``) and the config groups it
    chooses from (``experiment``, ``dataset``, ``trainer.optimizer``); the overrides are applied when they compose."""
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()  # the app's own initialisation, when its composition failed
    try:
        config = compose_app(app, overrides, return_hydra_config=True)
    except Exception:  # an override that does not compose: the app's defaults still name its keys
        config = compose_app(app, (), return_hydra_config=True)
    groups = [name.split("@")[-1].replace("/", ".") for name in config.hydra.runtime.choices
              if not name.startswith("hydra/")]
    tree = OmegaConf.to_container(config, resolve=False)
    tree.pop("hydra")
    keys = []

    def walk(node, prefix):
        for name, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{name}.")
            else:
                keys.append(f"{prefix}{name}")

    walk(tree, "")
    return sorted(set(keys) | set(groups))


def closest_keys(key: str, keys: Sequence[str], count: int = 3) -> list[str]:
    """The real keys closest to ``key``: those with its last part (``trainer.lr`` -> ``trainer.optimizer.lr``),
    else the closest full keys and the keys whose last part is closest (difflib), the closest first."""
    leaf = key.rsplit(".", 1)[-1]
    similarity = lambda k: difflib.SequenceMatcher(None, key, k).ratio()
    same_leaf = sorted((k for k in keys if k.rsplit(".", 1)[-1] == leaf), key=similarity, reverse=True)
    if same_leaf:
        return same_leaf[:count]
    by_leaf: dict[str, list[str]] = {}
    for k in keys:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    for cutoff in (0.8, 0.6):
        close = difflib.get_close_matches(key, keys, n=count, cutoff=cutoff)
        close += [k for name in difflib.get_close_matches(leaf, list(by_leaf), n=count, cutoff=cutoff)
                  for k in by_leaf[name]]
        close = sorted(set(close) - {key}, key=similarity, reverse=True)
        if close:
            return close[:count]
    return []


def key_hint(app: str, key: str, argv: Sequence[str]) -> str:
    """The hint for a key that does not exist: the closest real keys, else where every key is listed."""
    overrides = [arg for arg in argv if "=" in arg and not arg.startswith("-")
                 and arg.split("=", 1)[0].lstrip("+~") != key and not arg.startswith("hydra")]
    close = closest_keys(key, config_keys(app, overrides))
    listing = f"python {app} --cfg job lists every setting"
    if not close:
        return f"no setting has a name close to it; {listing}"
    return f"did you mean {' or '.join(close)}? ({listing})"


# ------------------------------------------------------------------------------------------------ output folder
def output_folder_error(error: BaseException, argv: Sequence[str]) -> BaseException | None:
    """An OSError of Hydra creating the app's output folder, restated naming the setting that chose the folder
    (``output_root=/proc/x: cannot create the output folder /proc/x (No such file or directory)``); else None."""
    if not isinstance(error, OSError) or not _raised_creating_hydra_folder(error):
        return None
    given = [arg.lstrip("+") for arg in argv if arg.lstrip("+").split("=", 1)[0] in OUTPUT_SETTINGS]
    setting = ", ".join(given) or "hydra.run.dir"
    reason = error.strerror or type(error).__name__
    refusal = ValueError(f"{setting}: cannot create the output folder {error.filename} ({reason}); nothing was "
                         f"written")
    refusal.add_note("choose a folder this user can create and write")
    return refusal


def _raised_creating_hydra_folder(error: BaseException) -> bool:
    """Whether ``error`` was raised by Hydra's own work before the task (creating the output folder), not by it."""
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame.f_code)
        traceback = traceback.tb_next
    for outer, inner in zip(frames, frames[1:]):
        if outer.co_name == "run_job" and Path(outer.co_filename).parts[-3:] == ("hydra", "core", "utils.py"):
            return Path(inner.co_filename).name in ("pathlib.py", "os.py", "__init__.py") and \
                inner.co_name in ("mkdir", "makedirs", "__init__", "_open")
    return False


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside a Hydra task: report a known error in one line and exit with status 1. In a sweep the error is left
    to the sweeper, which lists every job's outcome; with HYDRA_FULL_ERROR=1 (the user's) it keeps its traceback."""
    try:
        yield
    except Exception as error:
        if not is_known(error) or tracebacks_wanted() or _in_sweep():
            raise
        report(error)
        sys.exit(1)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


# ------------------------------------------------------------------------------------------------ experiments
def experiment_app(configs: Path, name: str) -> str | None:
    """The app whose ``configs/<app>/experiment/<name>.yaml`` exists (None when no app has it)."""
    for app, folder in APPS.items():
        if (configs / folder / "experiment" / f"{name}.yaml").is_file():
            return app
    return None


def _experiment_values(argv: list[str]) -> list[str]:
    """The experiments named on a command line (``experiment=a`` or a sweep ``experiment=a,b``)."""
    values = []
    for argument in argv:
        key, _, value = argument.partition("=")
        if key.lstrip("+") == "experiment" and value and "(" not in value:
            values += [part.strip().strip("'\"") for part in value.split(",") if part.strip()]
    return values


def check_experiment_app(app: str, configs: Path, argv: list[str]) -> None:
    """Refuse an experiment of another app before Hydra composes it (a ValueError naming the right command).
    An experiment no app has is left to Hydra, whose error lists this app's experiments."""
    if app not in APPS:
        return
    for name in _experiment_values(argv):
        owner = experiment_app(configs, name)
        if owner is not None and owner != app:
            error = ValueError(f"experiment={name} is an experiment of {owner} "
                               f"(configs/{APPS[owner]}/experiment/), not of {app}")
            error.add_note(f"python {owner} experiment={name}")
            raise error


# ------------------------------------------------------------------------------------------------ output folders
def _holds_only_hydra_files(folder: Path, own: Sequence[str] = ()) -> bool:
    """Whether ``folder`` holds nothing but what Hydra wrote before the task started (its job log, .hydra/) and the
    entries named in ``own``."""
    return all(entry.name == ".hydra" or entry.name in own or (entry.suffix == ".log" and entry.is_file())
               for entry in folder.iterdir())


@contextmanager
def removed_on_failure(folder: str | Path, own: Sequence[str] = ()) -> Iterator[Path]:
    """Remove ``folder`` (and the empty folders above it, up to the working directory) when the body fails and
    the folder is this call's own: absent, or holding only Hydra's job log (and the entries named in ``own``, which
    this call made, e.g. the run folder's lock it holds) when the body started. A folder that held anything else (a
    run folder, a folder the user named) is left as it is."""
    folder = Path(folder).absolute()
    fresh = not folder.exists() or (folder.is_dir() and _holds_only_hydra_files(folder, own))
    try:
        yield folder
    except BaseException:
        if fresh and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            _remove_empty_parents(folder)
        raise


def move_job_log(folder: str | Path, destination: str | Path) -> None:
    """After a task whose results went elsewhere (``evaluate.py run_dir=...`` writes into the run folder): append
    Hydra's job log in ``folder`` to ``destination`` (one log beside the results; appended and fsynced as a log
    handler appends, so a crash can cut only the new tail) and remove ``folder`` when it holds nothing else, so a
    successful call leaves no folder that holds only a log."""
    folder = Path(folder).absolute()
    if not folder.is_dir() or not _holds_only_hydra_files(folder):
        return
    logs = sorted(folder.glob("*.log"))
    for logger in (logging.getLogger(), *(logging.getLogger(name) for name in logging.root.manager.loggerDict)):
        for handler in list(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder:
                handler.close()  # flushes; the log's remaining records go to the console only
                logger.removeHandler(handler)
    destination = Path(destination)
    text = "".join(log.read_text() for log in logs)
    if text:
        with open(destination, "a") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    shutil.rmtree(folder, ignore_errors=True)
    _remove_empty_parents(folder)


def _remove_empty_parents(folder: Path) -> None:
    """rmdir the empty folders above ``folder`` that lie inside the working directory (outputs/sample/...), never
    the system's temporary folder itself."""
    cwd, temporary = Path.cwd().absolute(), Path(tempfile.gettempdir()).absolute()
    parent = folder.parent
    while parent != cwd and parent != temporary and cwd in parent.parents:
        try:
            parent.rmdir()
        except OSError:  # not empty (or not ours to remove)
            return
        parent = parent.parent


def given_on_command_line(key: str) -> bool:
    """Whether this invocation's overrides set ``key`` or a key under it (``dataset=cifar10``,
    ``dataset.path=...``); False outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    names = (override.split("=", 1)[0].lstrip("+~") for override in HydraConfig.get().overrides.task)
    return any(name == key or name.startswith(key + ".") for name in names)
