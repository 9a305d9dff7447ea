"""Optional dependencies, imported when a feature needs them, with an error that says what to do."""
from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, needed_for: str, extra: str) -> ModuleType:
    """Import ``module`` for a feature (``needed_for``: "reading data files") of the ``hsvfast[extra]`` extra.

    Not installed: an ImportError that names the pip command. Installed but failing to import (one of its own
    dependencies missing or of the wrong version): an ImportError that says so and carries the cause, instead
    of telling the user to install what they have.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.split(".")[0]
        if isinstance(error, ModuleNotFoundError) and error.name == package:
            raise ImportError(f"{needed_for} needs {package}: pip install {package} (or hsvfast[{extra}])") from error
        raise ImportError(f"{needed_for} needs {package}, which is installed but does not import: "
                          f"{type(error).__name__}: {error}") from error
