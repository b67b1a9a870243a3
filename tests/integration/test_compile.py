"""compute.compile: the training step of a torch.compile'd model equals eager, on CPU.

Inductor generates C++ on CPU, so this needs a C++ compiler (`make test` installs g++ when it is
missing). Compiling duet-micro's forward and backward takes ~40 s here.
"""

import torch
from torch.testing import assert_close

from tests.conftest import micro_models, micro_step_inputs
from train.compute import Precision
from train.config import ComputeConfig, LossConfig
from train.distributed import DistInfo
from train.objective import Inputs, StepLoss
from train.step import one_pass

CPU = torch.device("cpu")


def test_compiled_step_equals_eager_and_keeps_the_state_dict_keys():
    cfg, fp32 = LossConfig(kind="clip"), Precision("fp32", CPU)
    images, tokens = micro_step_inputs()
    eager, compiled = micro_models(ComputeConfig(), ComputeConfig(compile=True))
    assert_close(
        one_pass(compiled, Inputs(images, tokens), StepLoss(cfg, DistInfo(0, 1, 0, CPU)), fp32),
        one_pass(eager, Inputs(images, tokens), StepLoss(cfg, DistInfo(0, 1, 0, CPU)), fp32),
    )
    reference = dict(eager.named_parameters())
    grads = 0
    for name, param in compiled.named_parameters():
        assert_close(param.grad, reference[name].grad, rtol=1e-3, atol=1e-5, msg=name)
        grads += param.grad is not None
    assert grads == len(reference)
    # compiled in place: checkpoints and artifacts do not depend on the switch
    assert list(compiled.state_dict()) == list(eager.state_dict())
