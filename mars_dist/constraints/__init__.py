"""The constraint library: pure math on (fragments of) parameters. Never imports torch.distributed, deepspeed
or accelerate — the sharding layer hands it fragments and a reduce function."""

from mars_dist.constraints.engine import (Fragment, LayerStats, add_penalty_grads, bound_term, identity_reduce,
                                          measure, project)
from mars_dist.constraints.rules import Constraint
from mars_dist.constraints.selection import METHODS, full_shape, select_constraints, summary

__all__ = ["Constraint", "Fragment", "LayerStats", "METHODS", "add_penalty_grads", "bound_term", "full_shape",
           "identity_reduce", "measure", "project", "select_constraints", "summary"]
