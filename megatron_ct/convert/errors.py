"""The one error type of the converters."""


class ConversionError(ValueError):
    """Bad conversion input. The message is one line naming the file, tensor or key and
    what was expected; the CLI prints it and exits with status 2."""
