"""The one exception type users see: a message that names the problem and the fix."""


class SnapPruneError(ValueError):
    """Bad input or an impossible request.

    The CLI prints ``str(error)`` as one line and exits with code 2, so every message says what is
    wrong and what to do about it, without a traceback.
    """
