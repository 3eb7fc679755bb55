"""Where the shipped models and the demo sample are.

An installed wheel carries them as package data (``engine.assets_models``,
``engine.assets_samples``: the repository's ``models/`` and ``samples/`` folders mapped
into the package by ``pyproject.toml``); an editable install in a checkout reads the
folders where they are.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

__all__ = ["asset_dir"]

_CHECKOUT = Path(__file__).resolve().parent.parent


def asset_dir(kind: Literal["models", "samples"]) -> Path:
    """The folder of the shipped ``models`` or ``samples``."""
    spec = importlib.util.find_spec(f"engine.assets_{kind}")
    if spec is None or not spec.submodule_search_locations:  # a checkout without the links
        return _CHECKOUT / kind
    return Path(list(spec.submodule_search_locations)[0])
