"""Files written whole or not at all: a crash, Ctrl-C or a full disk never leaves half of one.

The one way every script writes what a user keeps (datasets, meta.json, checkpoints, the
downloaded text): into a temporary file beside the target, named for this process alone,
flushed to disk (fsync), then renamed over the target (os.replace is atomic on one file system).
Until the rename, the old file is untouched.
"""

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from errors import UserError


def new_temp(path: Path) -> Path:
    """A new empty file beside path, named for this run alone (process id and a random part):
    two runs writing into one folder never share a temporary file. Raises UserError when the
    folder cannot be written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        open(tmp, "xb").close()
    except OSError as e:
        raise UserError(f"cannot write in {path.parent}: {e.strerror}") from None
    return tmp


def write_synced(path: Path, data: bytes) -> None:
    """Write data to path and flush it to the disk before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes | Callable) -> None:
    """Write path whole or not at all: data is bytes, or a function that writes into an open
    binary file (e.g. `lambda f: torch.save(ckpt, f)`). Errors of the write (OSError, or what
    the function raises) propagate; the temporary file is gone either way."""
    tmp = new_temp(path)
    try:
        if isinstance(data, bytes):
            write_synced(tmp, data)
        else:
            with open(tmp, "wb") as f:
                data(f)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename
