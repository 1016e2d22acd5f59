"""One DeepSpeed process (ZeRO-3, bf16, CPU over gloo) for tests/api/test_api.py: the refusals of mars_dist.attach under
DeepSpeed, and the fp32 masters after a right attach. Writes a JSON of what happened to argv[1]."""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
os.environ.setdefault("MASTER_PORT", "29611")

import deepspeed  # noqa: E402

import mars_dist  # noqa: E402
from mars_dist.sharding.precision import batchnorm_in_fp32  # noqa: E402
from test_api import Net  # noqa: E402

CONFIG = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 9}


def engine_for(model):
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=CONFIG)
    return engine, opt


def refusal(call) -> str:
    try:
        call()
    except mars_dist.AttachError as e:
        return str(e)
    return "not refused"


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    result = {}
    torch.manual_seed(0)
    model = Net()
    batchnorm_in_fp32(model)  # DeepSpeed bf16 casts the module and does not autocast
    pretrained = mars_dist.capture_pretrained(model)
    w0 = model.conv.weight.detach().clone()
    engine, opt = engine_for(model)
    result["without_pretrained"] = refusal(lambda: mars_dist.attach(engine, opt, radius=0.1))
    result["other_optimizer"] = refusal(lambda: mars_dist.attach(
        engine, torch.optim.AdamW(Net().parameters()), radius=0.1, pretrained=pretrained))
    constrained = mars_dist.attach(engine, opt, radius=0.1, head_radius=1.0, pretrained=pretrained)
    masters = constrained.fp32_state_dict()
    result["masters_equal_pretrained"] = torch.equal(masters["conv.weight"], w0)
    result["bf16_rounding_differs"] = not torch.equal(w0.bfloat16().float(), w0)
    x = torch.randn(2, 3, 8, 8).bfloat16()
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    constrained.detach()
    result["after_step"] = refusal(lambda: mars_dist.attach(engine, opt, radius=0.1, pretrained=pretrained))
    with deepspeed.zero.Init(config_dict_or_path=CONFIG):  # partitioned at creation, by the user's own code
        partitioned = Net()
    batchnorm_in_fp32(partitioned)
    uncaptured = mars_dist.capture_pretrained(partitioned)
    engine2, opt2 = engine_for(partitioned)
    result["zero_init_uncaptured"] = refusal(lambda: mars_dist.attach(engine2, opt2, radius=0.1,
                                                                     pretrained=uncaptured))
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
