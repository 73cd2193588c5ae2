"""The exceptions mode-cotd raises for bad input. Each names the file or field at fault."""


class ModeCotdError(Exception):
    """Base class: a user-facing error with a message that says what was wrong."""


class DataError(ModeCotdError):
    """A data file is missing, empty or malformed."""


class BundleError(ModeCotdError):
    """A bundle (manifest, expert, gate, composition) is missing, corrupt or does not fit the student."""


class ConfigError(ModeCotdError):
    """A configuration has unknown keys or invalid values."""


class StudentError(ModeCotdError):
    """The student model cannot be found, converted or loaded."""
