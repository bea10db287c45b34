"""Bad input, said in one line.

Library code raises `InputError` (a `ValueError`) for anything the user can fix: a file, a
config key, a flag. The message names where the problem is, what is wrong, and what was
expected against what was found:

    raise input_error("ckpt/model_config.json", "n_heads must divide dim", 4096, 4000)
    # ckpt/model_config.json: n_heads must divide dim (expected 4096, got 4000)

Every CLI runs its `main` through `run_cli`, which prints `error: <message>` on one line and
exits 2 for bad input (`--debug` anywhere on the command line shows the traceback instead).
"""
from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any, Callable

_MISSING = object()


class InputError(ValueError):
    """Bad user input; the message is the whole story (no traceback needed)."""


def input_error(where: Any, what: str, expected: Any = _MISSING, got: Any = _MISSING) -> InputError:
    """`InputError("<where>: <what> (expected <expected>, got <got>)")`."""
    msg = f"{where}: {what}" if where not in (None, "") else what
    parts = []
    if expected is not _MISSING:
        parts.append(f"expected {expected}")
    if got is not _MISSING:
        parts.append(f"got {got!r}" if isinstance(got, str) else f"got {got}")
    return InputError(f"{msg} ({', '.join(parts)})" if parts else msg)


def read_json(path) -> Any:
    """The JSON in `path`; bad JSON or bytes raise one InputError naming the file and position."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise input_error(path, f"not valid JSON ({e})") from None


def _one_line(e: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception a CLI reports without a traceback."""
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e}", 2
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"{e.filename or 'writing the output'}: no space left on device", 1
    if isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)):
        where = e.filename or ""
        return (f"{where}: {e.strerror or e}" if where else str(e)), 2
    return str(e).splitlines()[0] if str(e) else type(e).__name__, 2


def run_cli(main: Callable[..., Any], argv: list[str] | None = None) -> int:
    """Run `main(argv)`; bad input ends as one `error:` line and exit 2 (`--debug`: traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LLAMA_JAX_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        rc = main(argv)
        return int(rc or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # InputError is a ValueError
        if debug:
            raise
        msg, rc = _one_line(e)
        print(f"error: {msg}", file=sys.stderr)
        return rc
