"""Exceptions the CLI turns into one clear line and a non-zero exit code."""


class PPLLaVAError(Exception):
    """Base class for errors caused by the user's input (checkpoint, config, arguments)."""


class ConfigError(PPLLaVAError):
    """config.json is unreadable, inconsistent or asks for something we do not support."""


class CheckpointError(PPLLaVAError):
    """Weight files are missing, truncated, or do not match the model the config describes."""


class InputError(PPLLaVAError):
    """Tensors handed to the model have the wrong shape, dtype or content."""
