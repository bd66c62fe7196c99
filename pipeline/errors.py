"""Errors that reach the user as one line (the CLI prints ``error: <message>`` and exits non-zero)."""


class PipelineError(Exception):
    """A failure the user can act on; its message is one line naming the item or key."""

    exit_code = 1


class ConfigError(PipelineError):
    exit_code = 2


class StoreError(PipelineError):
    pass


class ArtifactNotFound(StoreError):
    pass


class StageError(PipelineError):
    pass


class MissingInput(StageError):
    """An upstream stage has not completed: deterministic, so exit 2 (a Job fails at once, no retries)."""

    exit_code = 2
