"""User-facing errors: raised for bad input, printed as one line by the CLIs."""

import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (config, data, workdir); the CLI prints it and exits non-zero."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss stayed NaN); checkpoints already written are kept."""


def run_cli(prog: str, job: Callable[[], object]) -> int:
    """Runs a CLI's job with mmjax's INFO logging; a UserError or TrainingError becomes one
    `prog: error: ...` line on stderr and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmjax").setLevel(logging.INFO)
    try:
        job()
    except (UserError, TrainingError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
