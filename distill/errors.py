"""User-facing errors: one clear line, a non-zero exit, no traceback (unless --debug)."""

import re


class DistillError(Exception):
    """Bad input or an unrecoverable condition the user can fix; the message says what and how.

    The CLI prints ``str(err)`` on one line and exits with ``exit_code`` (2 = bad input).
    """

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def load_error_reason(err: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` (or a reader) failed on a file.

    Torch's refusal of a pickled object advises re-running with ``weights_only=False``; that advice
    is never ours to give, so only the object it refused is named. An empty message (an empty
    file raises a bare ``EOFError``) becomes the exception's type.
    """
    text = str(err)
    if "Weights only load failed" in text:
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            return f"it holds pickled objects, which are never loaded ({refused.group(1)})"
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        return "it is not a file of tensors" + (f" ({detail.group(1).strip()})" if detail else "")
    if isinstance(err, EOFError):
        return "the file is empty or cut short"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__
