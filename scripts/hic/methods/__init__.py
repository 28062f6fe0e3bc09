"""Training methods by name (the ``method`` of a ``clip.runs`` entry); see ``hic.methods.base``."""

from __future__ import annotations

import importlib

from hic.methods.base import Method

# name -> module under hic.methods holding the class (imported on use: a run pulls in only
# its own method's dependencies).
METHODS = {
    "clip": "clip",
    "longclip": "longclip",
    "flair": "flair",
    "cosmos": "cosmos",
    "flame": "flame",
    "llm2clip": "llm2clip",
}


def method_for(settings) -> Method:
    """The method object of a run's settings (``settings.method``, ``settings.options``)."""
    if settings.method not in METHODS:
        raise ValueError(f"unknown method {settings.method!r}; choose one of {sorted(METHODS)}")
    module = importlib.import_module(f"hic.methods.{METHODS[settings.method]}")
    cls = next(
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, Method) and c.name == settings.method
    )
    return cls(settings)
