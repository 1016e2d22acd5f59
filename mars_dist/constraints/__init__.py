"""The constraint library: pure math on (fragments of) parameters. Never imports torch.distributed, deepspeed
or accelerate — the sharding layer hands it fragments and a reduce function. `methods` (the method registry) is
plain Python; the rest is imported on first use, so the config can read the registry without loading torch."""

import importlib

_PUBLIC = {"Fragment": "engine", "LayerStats": "engine", "add_penalty_grads": "engine", "bound_term": "engine",
           "identity_reduce": "engine", "measure": "engine", "project": "engine", "Constraint": "rules",
           "full_shape": "selection", "select_constraints": "selection", "summary": "selection",
           "METHODS": "methods", "Method": "methods", "method": "methods"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(f"mars_dist.constraints.{_PUBLIC[name]}"), name)
    raise AttributeError(f"module 'mars_dist.constraints' has no attribute {name!r}")
