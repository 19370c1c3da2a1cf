"""User-facing errors: one clear line, a non-zero exit, no traceback (unless --debug)."""


class DistillError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the message says what and how.

    The CLI prints ``str(err)`` on one line and exits with ``exit_code`` (2 = bad input).
    """

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
