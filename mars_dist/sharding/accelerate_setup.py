"""Launcher settings that decide whether the projection is right, fixed before `accelerator.prepare`."""

from __future__ import annotations


def configure_accelerator(accelerator, grad_clip: float | None) -> None:
    """Make DeepSpeed's "auto" values match the single-process semantics of the config.

    accelerate fills an "auto" gradient_clipping with 1.0, which would clip under ZeRO but not without it and break
    the equivalence between backends; set it from train.grad_clip (0 = off) instead.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = float(grad_clip or 0.0)
    ds.setdefault("zero_allow_untested_optimizer", True)  # we pass a plain torch optimizer (hooks live there)
