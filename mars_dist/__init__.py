"""mars_dist: distributed fine-tuning of vision backbones with distance-based constraints (MARS-PGM)."""

import os
import sys

__version__ = "0.1.0"

# DeepSpeed JIT-builds its CPU op (~40 s) into TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions, shared by
# every env: two virtual envs (other torch builds) alternating there rebuild it in turn. Keep the build per virtual
# env, once; set here because every launcher's workers import mars_dist before DeepSpeed builds anything.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
