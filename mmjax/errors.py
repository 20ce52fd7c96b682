"""User-facing errors: raised for bad input, printed as one line by the CLIs."""


class UserError(Exception):
    """Bad input from the user (config, data, workdir); the CLI prints it and exits non-zero."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss stayed NaN); checkpoints already written are kept."""
