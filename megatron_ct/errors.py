"""The expected-failure types of megatron-ct.

Every one of them carries a single-line message that names the file or config key at fault
and what was expected. Entry points (the trainer and each tool) print it as
``error: <message>`` and exit with status 2; anything else is a bug and keeps its traceback.
"""


class CTError(Exception):
    """An expected failure caused by input or environment, reported in one line."""


class ConfigError(CTError, ValueError):
    """A bad configuration value. The message names the key and what was expected."""


class ConversionError(CTError, ValueError):
    """Bad conversion input (a checkpoint, a Hugging Face directory, an option)."""


class CheckpointError(CTError):
    """A checkpoint that cannot be saved or loaded as asked (missing, corrupt, full disk)."""


class DataError(CTError):
    """A dataset, tokenizer or corpus that cannot be used as configured."""
