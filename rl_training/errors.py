"""User-facing errors.

Anything a user can cause (a bad config key, a missing file, a malformed record) raises a
subclass of ``UserError`` with a one-line message naming what is wrong. Runners catch it,
print that line and exit nonzero; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error in the user's input; its message is shown as one line."""


class ConfigError(UserError, ValueError):
    """A bad config key, type or value."""


class DataError(UserError, ValueError):
    """A missing or malformed data file or record."""


class ModelError(UserError):
    """A model, tokenizer or GGUF file that cannot be resolved or loaded."""


def import_dotted(path: str, what: str):
    """The object named by ``pkg.module.attr``; a ConfigError naming ``what`` if it can't be imported."""
    import importlib

    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{what} '{path}' cannot be imported: {e}") from None
