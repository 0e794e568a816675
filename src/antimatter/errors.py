"""The one exception type the CLI turns into a one-line message (no traceback) and a non-zero exit."""


class UserError(Exception):
    """Something the user can fix: the message names the problem and the fix."""


def shorten(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters: an error line quotes what it names, it does not print it whole."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
