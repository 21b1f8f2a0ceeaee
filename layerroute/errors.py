"""Errors that name what the user has to change."""


class LayerRouteError(Exception):
    """Base class for every error this library raises on purpose."""


class ConfigError(LayerRouteError, ValueError):
    """A configuration value is unknown, of the wrong type, or impossible. The message names the key."""


class DataError(LayerRouteError):
    """A dataset could not be loaded, or too many of its rows were malformed."""


class ModelLoadError(LayerRouteError):
    """A model could not be found or loaded (offline hub, missing package, unsupported family)."""


class AdapterError(LayerRouteError):
    """An adapter directory is missing, pickled, or belongs to another base model."""


class TrainingError(LayerRouteError):
    """A training run stopped on purpose: a non-finite loss, or a checkpoint that cannot be resumed."""
