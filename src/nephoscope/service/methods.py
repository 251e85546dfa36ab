"""The registry of introspection methods the faces can run."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from nephoscope.core.errors import NephoscopeError
from nephoscope.introspect.base import METHOD_NAMES, Method

# method name -> "module:factory"; a method whose module is absent is simply not offered
_FACTORIES = {
    "agent": "nephoscope.introspect.agent:AgentMethod",
    "driver": "nephoscope.introspect.driver:DriverMethod",
    "inspect": "nephoscope.introspect.inspect:InspectMethod",
    "checkpoint": "nephoscope.introspect.checkpoint:CheckpointMethod",
    "arch": "nephoscope.introspect.arch:ArchMethod",
    "trap": "nephoscope.introspect.trap:TrapMethod",
}


def _factory(name: str) -> Callable[[], Method] | None:
    module, _, attr = _FACTORIES[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None


def available_methods() -> list[str]:
    """Return the names of the methods this installation can run, in canonical order."""
    return [n for n in METHOD_NAMES if _factory(n) is not None]


def default_methods() -> list[str]:
    """Return the methods `scan` runs by default (all available except the event-driven trap and the driver).

    The driver needs nephoscope's kernel module inside the guest (the customer's side of the trade): it is
    run only when asked for (`--methods driver`, evaluate on guests that load it)."""
    return [n for n in available_methods() if n not in ("trap", "driver")]


def get_method(name: str, **options: object) -> Method:
    """Instantiate method `name` (with method-specific options) or raise naming the available ones."""
    if name not in _FACTORIES:
        raise NephoscopeError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
    factory = _factory(name)
    if factory is None:
        raise NephoscopeError(f"method {name!r} is not available in this build; available: "
                              f"{', '.join(available_methods())}")
    return factory(**options)  # type: ignore[call-arg]
