"""One error family for everything a user can get wrong; messages say what and where, and how to fix it.

This module is the ground floor: bot/, inference/, training/, config/ and the CLI all raise these, so it imports
nothing of the project (a test checks), and no layer has to import the CLI package to raise an error.

The CLI prints `str(error)` on one line and exits 2. Anything that is not a ConvoError is a bug and keeps
its traceback. Foreign errors are wrapped where they enter:
`raise IngestError(f"{path}:{line}: expected a WhatsApp timestamp") from e`.
"""


class ConvoError(Exception):
    """Base class of every error caused by input, configuration or environment rather than a bug."""


class ConfigError(ConvoError):
    """Bad settings: a config file, an environment variable or a CLI option."""


class IngestError(ConvoError):
    """An export file that cannot be read; the message names the file and the line or byte offset."""


class DatasetError(ConvoError):
    """A message log that cannot become a dataset (unknown persona, no samples, empty split...)."""


class TrainError(ConvoError):
    """Training cannot start or continue (existing output dir, no CUDA for --qlora, ...)."""


class AdapterMismatch(ConvoError):
    """An adapter that does not fit the base model or prompt format it is used with."""


class ProtocolError(ConvoError):
    """A malformed queue message."""


class EvalError(ConvoError):
    """Evaluation cannot run (no validation data, unknown method, API misconfigured...)."""
