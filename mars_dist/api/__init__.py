"""The public API: the constraint in any training loop (docs/api.md). `core` holds it; `guards` the refusals and
fingerprints; `wiring` finds the engine, inner optimizer, head and backend behind whatever the user prepared."""

from mars_dist.api.core import Constrained, Pretrained, attach, capture_pretrained
from mars_dist.api.guards import AttachError

__all__ = ["AttachError", "Constrained", "Pretrained", "attach", "capture_pretrained"]
