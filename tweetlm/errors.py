"""UserError: the one exception that becomes a one-line message (exit 2) or an HTTP 4xx; ConfigError, the one
way every config checks its fields (`check`), naming the field so that the CLI can name its flag instead."""


class UserError(Exception):
    """A mistake the user can fix: say what is wrong and how to fix it, in one line."""


class ConfigError(UserError):
    """An invalid config field: `field` as the config spells it ("workers", "model.depth"), its value, the fix."""

    def __init__(self, field: str, value, fix: str):
        super().__init__(f"{field} = {value!r}: {fix}")
        self.field, self.value, self.fix = field, value, fix


def check(ok: bool, field: str, value, fix: str) -> None:
    """Raise ConfigError(field, value, fix) unless ok: `check(self.workers >= 1, "workers", self.workers, "must be
    at least 1")`."""
    if not ok:
        raise ConfigError(field, value, fix)
