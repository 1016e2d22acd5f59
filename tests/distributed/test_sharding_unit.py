"""In-process checks of the sharding layer's helpers (no process group needed)."""

import json
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from mars_dist.sharding import (AnchorLayoutError, build_backend, check_anchor_layout, named_parameters,
                                register_after_step_hook)


def test_after_step_hook_runs_after_the_optimizers_own_post_hooks():
    """The write-back / low-precision re-copy must see the projection done by the ProjectionHook's post hook."""
    p = torch.nn.Parameter(torch.ones(3))
    opt, other = torch.optim.SGD([p], lr=0.1), torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    order = []
    handle = register_after_step_hook(opt, lambda: order.append("after"))
    opt.register_step_post_hook(lambda *_: order.append("own"))
    p.grad = torch.ones(3)
    opt.step()
    other.step()  # another optimizer: not ours
    handle.remove()
    opt.step()
    assert order == ["own", "after", "own"]


def test_anchor_layout_mismatch_names_the_difference():
    layout = {"backend": "zero", "stage": 3, "world_size": 2, "rank": 0, "params": {"a.weight": [0, 12]}}
    check_anchor_layout(layout, dict(layout))
    with pytest.raises(AnchorLayoutError, match=r"world_size=4, this run has world_size=2.*pretrained weights"):
        check_anchor_layout({**layout, "world_size": 4}, layout)
    with pytest.raises(AnchorLayoutError, match=r"'a.weight' has \(offset, numel\)=\[6, 6\]"):
        check_anchor_layout({**layout, "params": {"a.weight": [6, 6]}}, layout)


def test_named_parameters_drop_wrapper_prefixes():
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = torch.nn.Sequential(torch.nn.Linear(2, 3))
    assert list(named_parameters(Wrapper(inner))) == ["0.weight", "0.bias"]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="constraint.mode: unknown mode 'all'"):
        build_backend(None, None, None, [], mode="all")


ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("stage,name,init", [(1, "zero1", False), (2, "zero2", False), (3, "zero3", False),
                                             (3, "zero3_init", True)])
def test_zero_launch_configs(stage, name, init):
    cfg = load_config_from_file(str(ROOT / f"launch/accelerate/{name}.yaml"))
    assert bool(cfg.deepspeed_config["zero3_init_flag"]) is init
    assert cfg.distributed_type == DistributedType.DEEPSPEED and cfg.num_processes == 2
    assert cfg.mixed_precision is None, "accelerate refuses mixed_precision next to a deepspeed_config_file"
    ds = json.loads((ROOT / cfg.deepspeed_config["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["zero_allow_untested_optimizer"] is True
    assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"


def test_fsdp2_launch_config():
    cfg = load_config_from_file(str(ROOT / "launch/accelerate/fsdp2.yaml"))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes == 2
    assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.mixed_precision == "no"


def test_after_step_hook_does_not_keep_its_backend_alive():
    import gc
    import weakref

    class Backend:
        calls = 0

        def finish(self):
            Backend.calls += 1

    p = torch.nn.Parameter(torch.ones(1))
    opt, backend = torch.optim.SGD([p], lr=0.1), Backend()
    handle = register_after_step_hook(opt, backend.finish)
    alive = weakref.ref(backend)
    opt.step()
    del backend
    gc.collect()
    opt.step()
    handle.remove()
    assert alive() is None and Backend.calls == 1
