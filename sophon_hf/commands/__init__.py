"""The `sophon-hf` subcommands, and what they share."""

import os
import traceback
from contextlib import contextmanager


@contextmanager
def user_errors(command: str):
    """Turn the errors a user's input causes into a one-line message of `sophon-hf COMMAND`.

    Data or a model that cannot be loaded (missing folder, Hub offline, wrong columns), a setting that is refused:
    the message names the fix and a traceback would bury it (`SOPHON_HF_DEBUG=1` shows it).
    """
    try:
        yield
    except (OSError, ValueError) as error:
        if os.environ.get("SOPHON_HF_DEBUG"):
            raise
        # Where it was raised, for the rare error that is a bug rather than a user's input.
        frame = traceback.extract_tb(error.__traceback__)[-1]
        raise SystemExit(
            f"sophon-hf {command}: {type(error).__name__}: {error}\n(raised at {os.path.basename(frame.filename)}:"
            f"{frame.lineno}; set SOPHON_HF_DEBUG=1 to see the traceback)"
        ) from None
