"""Domain errors raised by services. Views and API classes translate them to HTTP."""

from __future__ import annotations


class AnnotationError(Exception):
    """Base class. ``message`` is safe to show to the user."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CampaignNotActive(AnnotationError):
    status_code = 409


class ScreeningFailed(AnnotationError):
    """The rater did not pass the campaign's screening: no more work for them there."""

    status_code = 403


class LeaseLost(AnnotationError):
    """The slot's lease expired and someone else took it, or it was never this rater's."""

    status_code = 409


class InvalidJudgment(AnnotationError):
    """The submitted answer does not fit the campaign's form (field named in the message)."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class ImportRejected(AnnotationError):
    """An import file was rejected; nothing was written. ``errors`` name line and field."""

    def __init__(self, message: str, *, errors: list[dict[str, object]]) -> None:
        super().__init__(message)
        self.errors = errors
