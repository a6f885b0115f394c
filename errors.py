"""The one user-facing error: bad input, said in one line, never a traceback.

Every script raises UserError for a mistake a user can mend (no prepared data, a foreign
checkpoint, a character outside the vocabulary, a flag that cannot work), and its main()
prints it as `script.py: error: <message>` with exit code 2. A run that stops for a reason of
its own (a loss that is no longer finite) raises it with status=1 and says "stopped".
This module imports nothing of the project: every other module may import it.
"""

import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, with exit code `status`, no traceback.

    status: 2 for bad input (argparse's convention), 1 for a run that stopped by itself.
    label: the word before the message, "error" or "stopped"."""

    def __init__(self, message: str, status: int = 2, label: str = "error"):
        super().__init__(message)
        self.status, self.label = status, label


def first_line(e: Exception) -> str:
    """An exception as one short line, for the one-line error messages of every script."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def readable_output() -> None:
    """Let stdout and stderr print any text. A file name or argument holding bytes that are not
    UTF-8 reaches Python as lone surrogates (surrogateescape); a strict UTF-8 locale
    (en_US.UTF-8) would end the script with a UnicodeEncodeError when printing it. They print
    as \\udcXX instead. Every script's main() calls this first."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
