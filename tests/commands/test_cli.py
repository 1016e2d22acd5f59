"""The command line: bad input ends with one line naming the problem and exit code 2, nothing saved is lost."""

import pytest

from mars_dist.cli import main


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("override, expected", [
    ("model.name=resnet_18x", "unknown timm model name 'resnet_18x'; closest timm names: resnet18"),
    ("data.name=imagefolder data.path=/nonexistent/flowers", "/nonexistent/flowers"),
    ("resume=/nonexistent/ckpt", "checkpoint directory not found: /nonexistent/ckpt"),
    ("constraint.head_radius=0", "'constraint.head_radius' = 0.0 must be > 0"),
    ("train.optimiser=sgd", "did you mean 'train.optimizer'"),
])
def test_bad_input_names_the_problem(capsys, tmp_path, override, expected):
    code, err = run(capsys, "train", *override.split(), f"output_dir={tmp_path}", "tracking.wandb_mode=disabled",
                    "data.train_per_class=1", "data.val_per_class=1", "data.test_limit=10", "train.batch_size=4")
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def test_config_command_prints_resolved_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["config", "train.lr=0.25"])
    assert e.value.code == 0
    assert "lr: 0.25" in capsys.readouterr().out
