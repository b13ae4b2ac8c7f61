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


class WriteError(VaelabError):
    """An output that could not be written (full disk, read-only place, a folder in the way);
    the destination keeps its previous content."""

    def __init__(self, path, reason: str, existed: bool = True):
        self.path, self.reason = path, reason
        kept = "its previous version is unchanged" if existed else "nothing was written"
        super().__init__(f"{path}: cannot write ({reason}); {kept}")


class RunInUseError(RunExistsError):
    """A run folder another process is training in (it holds the folder's lock)."""


class PeerLost(VaelabError):
    """Data-parallel training: another process of the job stopped while this one waited for it."""


class TrainingInterrupted(VaelabError):
    """Ctrl-C or SIGTERM: the state was saved; the message says how to resume."""

    def __init__(self, message: str, signal_name: str = ""):
        super().__init__(message)
        self.signal_name = signal_name
