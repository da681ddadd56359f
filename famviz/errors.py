"""User-facing errors: one clear line, never a traceback, in the CLI and the app."""


class FamvizError(Exception):
    """An error caused by the user's input or environment, with a message meant for them."""


class DocumentError(FamvizError):
    """A document could not be read as text (missing, empty, binary, undecodable, too large)."""


class UnsupportedModelError(FamvizError):
    """A model whose architecture the FAM engine cannot convert."""


class ConfigError(FamvizError):
    """Invalid FAM/engine settings (block size, FAM length, memory blocks, mode)."""


class AdapterError(FamvizError):
    """An adapter directory that is missing, malformed or made for another model/config."""
