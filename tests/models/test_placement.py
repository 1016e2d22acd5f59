"""Building and precision pieces that need no process group: constraints from the FULL shape of a partitioned
parameter, the coverage check that refuses a silently unconstrained parameter, the seeded fresh head, and BatchNorm
computing in fp32 when DeepSpeed has cast the weights but not the running statistics."""

import pytest
import torch
from torch import nn

from mars_dist.constraints import select_constraints
from mars_dist.models.factory import build_model, classifier_module_names
from mars_dist.models.placement import init_fresh_head_
from mars_dist.sharding import ReplicatedBackend
from mars_dist.sharding.precision import batchnorm_in_fp32


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def partition_like_zero3(param: nn.Parameter) -> None:
    """What ZeRO-3 leaves outside a gather: an empty tensor, the true shape in `ds_shape`."""
    param.ds_shape = param.shape
    param.data = torch.empty(0)


def test_constraints_use_the_full_shape_of_a_partitioned_parameter():
    net = tiny_net()
    whole = select_constraints(net, ["3"], "mars-pgm", 1.0, 2.0)
    for p in net.parameters():
        partition_like_zero3(p)
    parted = select_constraints(net, ["3"], "mars-pgm", 1.0, 2.0)
    assert [(c.name, c.shape, c.num_rows, c.row_len) for c in parted] == \
           [(c.name, c.shape, c.num_rows, c.row_len) for c in whole]


def test_a_parameter_with_no_elements_is_refused_by_name():
    net = tiny_net()
    net[0].weight.data = torch.empty(0)  # partitioned, but no ds_shape to say what it was
    with pytest.raises(ValueError, match=r"parameter '0.weight' has shape \(0,\)"):
        select_constraints(net, ["3"], "mars-pgm", 1.0, 2.0)


def test_coverage_check_names_a_constraint_the_projection_would_miss():
    net = tiny_net()
    constraints = select_constraints(net, ["3"], "mars-pgm", 1.0, 2.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ReplicatedBackend(constraints, net, opt).verify_coverage()  # whole parameters: fine
    constraints[0].shape = (8, 3, 3, 3)  # selected on another (e.g. partitioned or different) model
    with pytest.raises(ValueError, match=r"'0.weight': shape \(8, 3, 3, 3\) but the parameter's full shape is"):
        ReplicatedBackend(constraints, net, opt).verify_coverage()

    class Missing(ReplicatedBackend):  # fragments that leave a parameter out on every rank
        def fragments(self):
            frags = super().fragments()
            frags[-1].w = frags[-1].w[:0]
            return frags

    constraints = select_constraints(net, ["3"], "mars-pgm", 1.0, 2.0)
    with pytest.raises(ValueError, match=r"'3.weight': this run's fragments cover 0 of its 720 elements"):
        Missing(constraints, net, opt).verify_coverage()


def test_fresh_head_depends_on_the_seed_only():
    torch.manual_seed(1)
    a = build_model("resnet18", "none", 7, head_seed=3)
    torch.manual_seed(2)
    torch.randn(100)  # construction consumed other random numbers
    b = build_model("resnet18", "none", 7, head_seed=3)
    c = build_model("resnet18", "none", 7, head_seed=4)
    assert torch.equal(a.fc.weight, b.fc.weight) and torch.equal(a.fc.bias, b.fc.bias)
    assert not torch.equal(a.fc.weight, c.fc.weight)
    bound = 1 / 512 ** 0.5  # torch's default Linear init range
    assert float(a.fc.weight.detach().abs().max()) <= bound and float(a.fc.weight.detach().std()) > bound / 3
    # an explicit call writes the same values
    init_fresh_head_(c, classifier_module_names(c), 3)
    assert torch.equal(c.fc.weight, a.fc.weight)


@pytest.mark.parametrize("train_mode", [True, False])
def test_batchnorm_computes_in_fp32_under_bf16_weights(train_mode):
    """DeepSpeed's bf16 cast: weights bf16, running statistics fp32. Plain F.batch_norm refuses the mix; with
    batchnorm_in_fp32 the output is bf16 and the statistics are updated in fp32 exactly as an fp32 BN would."""
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-1, 1)
        ref.weight.copy_(ref.weight.bfloat16().float()), ref.bias.copy_(ref.bias.bfloat16().float())
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(ref.state_dict())
    for p in bn.parameters():
        p.data = p.data.bfloat16()
    ref.train(train_mode), bn.train(train_mode)
    x = torch.randn(8, 4, 5, 5).bfloat16()
    with pytest.raises(RuntimeError, match="expected scalar type"):
        bn(x)
    assert batchnorm_in_fp32(bn) == 1 and batchnorm_in_fp32(bn) == 0  # idempotent
    y = bn(x)
    want = ref(x.float())
    assert y.dtype == torch.bfloat16 and torch.equal(y, want.bfloat16())
    assert bn.running_var.dtype == torch.float32 and torch.equal(bn.running_var, ref.running_var)
    y.float().sum().backward()
    assert bn.weight.grad is not None and bn.weight.grad.dtype == torch.bfloat16
