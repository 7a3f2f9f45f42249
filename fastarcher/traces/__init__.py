"""Research traces of the actor step: gradient-projection influence and per-token entropy.

    from fastarcher.traces import TraceConfig, InfluenceTracer, EntropyTracer

API, semantics, knobs and artifact schema: docs/traces.md. Viewer:
`python -m fastarcher.traces.view RUN_DIR --step N`. Names are imported lazily, so the viewer
(numpy + matplotlib) starts without importing torch.
"""
from importlib import import_module

__all__ = ["TraceConfig", "InfluenceTraceConfig", "EntropyTraceConfig", "InfluenceTracer", "EntropyTracer"]

_WHERE = {
    "TraceConfig": ".config",
    "InfluenceTraceConfig": ".config",
    "EntropyTraceConfig": ".config",
    "InfluenceTracer": ".capture",
    "EntropyTracer": ".entropy",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
