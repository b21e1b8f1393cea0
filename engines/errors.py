"""Error types of the model side. Every refusal is one line naming the thing and what was expected."""


class EngineError(Exception):
    """Base of every error the model side raises on purpose."""


class BundleError(EngineError):
    """A model bundle is missing, incomplete, tampered with, or not what the caller expected."""


class WeightsError(EngineError):
    """Backbone weights cannot be found or do not fit the backbone."""


class DataError(EngineError):
    """An image or dataset folder cannot be read or does not have the expected layout."""
