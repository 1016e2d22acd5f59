"""mars_dist: distributed fine-tuning of vision backbones with distance-based constraints (MARS-PGM)."""

import os
import sys

__version__ = "0.1.0"

# DeepSpeed JIT-builds its CPU op (~40 s) into TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions, shared by
# every env: two virtual envs (other torch builds) alternating there rebuild it in turn. Keep the build per virtual
# env, once; set here because every launcher's workers import mars_dist before DeepSpeed builds anything.
if sys.prefix != sys.base_prefix:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

# The public API (docs/api.md), imported on first use: `import mars_dist` stays cheap (no torch, no DeepSpeed).
_API = {"capture_pretrained": "mars_dist.api", "attach": "mars_dist.api",
        "Constrained": "mars_dist.api",
        "Pretrained": "mars_dist.api", "AttachError": "mars_dist.api.guards",
        "ConstraintConfig": "mars_dist.config", "FtpConfig": "mars_dist.config", "RadiusGroup": "mars_dist.config",
        "SpdConfig": "mars_dist.config",
        "batchnorm_in_fp32": "mars_dist.sharding.precision"}  # DeepSpeed bf16/fp16 does not autocast BatchNorm
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mars_dist' has no attribute {name!r}")
