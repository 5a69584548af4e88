"""Small file helpers every stage shares: atomic writes and line-numbered jsonl reading.

Atomic: a reader (or a crash) never sees a half-written checkpoint, feature file or prediction:
we write to a temporary file in the same directory, fsync it, then rename over the target.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple, Union

PathLike = Union[str, os.PathLike]


def _new_temp(path: Path, suffix: str) -> str:
    """An empty temporary sibling of `path`. mkstemp creates it 0600; give it the permissions a plain
    open() would (0666 less the umask), since it becomes the user's data file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=str(path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    os.close(fd)
    return tmp


class InputError(ValueError):
    """Bad user input; the message names the file and line (or id) to fix."""


EXIT_BAD_INPUT = 2  # a command stopped by a user mistake (argparse exits with 2 for bad flags too)


def report_input_error(prog: str, error: Exception) -> int:
    """A user mistake, said the way argparse says a bad flag: one line `prog: error: ...` on stderr,
    no traceback. Returns the command's exit status."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


@contextlib.contextmanager
def _replacing(path: PathLike, suffix: str):
    """Yield a temporary sibling of `path`; if the block succeeds it is fsynced and renamed over
    `path`, otherwise removed, leaving `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(path, suffix)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: PathLike):
    """Yield a temporary path beside `path` for writers that want a file name (np.savez, torch.save);
    it keeps the target's extension (np.savez would append .npz otherwise) and is renamed to `path`
    only if the block succeeds."""
    with _replacing(path, ".tmp" + Path(path).suffix) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary sibling of `path` for writing; on success it replaces `path` atomically,
    on an exception it is removed and `path` is left as it was."""
    kwargs = {} if "b" in mode else {"encoding": encoding}
    with _replacing(path, ".tmp") as tmp, open(tmp, mode, **kwargs) as f:
        yield f


@contextlib.contextmanager
def atomic_paths(*paths: PathLike) -> Iterator[Tuple[Path, ...]]:
    """atomic_path for files that belong together (weights and the config JSONs beside them): yield a
    temporary sibling per path; only when the whole block succeeded are they fsynced and renamed into
    place, in the order given (put the main file last). On an exception every temporary is removed and
    no target is touched: a failed command leaves no part of its result."""
    targets = [Path(p) for p in paths]
    temps = []
    try:
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(Path(_new_temp(path, ".tmp" + path.suffix)))
        yield tuple(temps)
        for tmp in temps:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        for tmp, path in zip(temps, targets):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise


def read_json_object(path: PathLike, error: type = InputError) -> Dict[str, Any]:
    """A JSON file that must hold one object; `error` (InputError by default) names the file and
    line of a syntax error, or says what the file holds instead."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_jsonl(path: PathLike) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yield (line_number, object) for each non-blank line; a line that is not a JSON object raises
    InputError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, json_object_line(line, f"{path}:{lineno}")


def json_object_line(line: str, where: str, error: type = InputError) -> Dict[str, Any]:
    """One jsonl line that must hold a JSON object; `error` names `where` (file:line) otherwise."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj
