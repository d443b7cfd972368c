"""Per-op placement rules for propagate_placements: (walk, node) -> the output's placement.

Each rule registers itself with @rule(op, ...) where it is defined (walk.py holds the table, the walk state
and the errors). matmul.py: linear, addmm, matmul, embedding, attention. views.py: ops that move, regroup or
cut dims. elementwise.py: pointwise ops, norms, softmax, in-place writes. Importing this package imports
them all, so RULES is complete.
"""
from tpcompile.passes.rules import elementwise, matmul, views  # noqa: F401  (each registers its rules)
from tpcompile.passes.rules.walk import (RULES, NeedFewerWays, NeedPlacement, Propagation, ShardingError, Walk,
                                         fallback, rule, shape_of, sharded)

__all__ = ["RULES", "rule", "Walk", "Propagation", "ShardingError", "NeedPlacement", "NeedFewerWays",
           "fallback", "shape_of", "sharded"]
