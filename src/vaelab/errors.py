"""The project's own error types.

Every mistake a user can make surfaces as a `VaelabError`; the CLI prints its message on one line
and exits non-zero. Anything else escaping is a bug.
"""


class VaelabError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class DataError(VaelabError):
    """Missing, corrupt or unverifiable dataset files."""


class ConfigError(VaelabError):
    """A bad option, config field or value."""


class CheckpointError(VaelabError):
    """A run folder or checkpoint that cannot be loaded."""


class RunExistsError(VaelabError):
    """An output folder that already holds something."""


class DivergenceError(VaelabError):
    """Training produced a non-finite loss or gradient."""
