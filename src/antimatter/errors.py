"""The one exception type the CLI turns into a one-line message (no traceback) and a non-zero exit."""


class UserError(Exception):
    """Something the user can fix: the message names the problem and the fix."""
