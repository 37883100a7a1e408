"""UserError: the one exception that becomes a one-line message (exit 2) or an HTTP 4xx."""


class UserError(Exception):
    """A mistake the user can fix: say what is wrong and how to fix it, in one line."""
