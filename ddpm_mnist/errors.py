"""The one exception type the CLI turns into a single line and exit code 2."""


class UserError(Exception):
    """Bad input from the user (config, arguments, checkpoint, data): one line, no traceback."""


class ConfigError(UserError):
    """A config file or `--set` override that does not fit the schema."""


class DataError(UserError):
    """MNIST is missing, unreadable or cannot be downloaded."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable, unsafe or of another format."""


class RunError(UserError):
    """A run folder or training state that refuses the requested action."""
