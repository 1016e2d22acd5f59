"""Updates per epoch when grad_accum does not divide a process's micro-batches (issue #10 part 2): accelerate's
`accumulate` ends every epoch with a partial update (it syncs at end_of_dataloader), so an epoch of b batches per
process has ceil(b / grad_accum) updates; epochs and `step_size_epochs` must count those."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader

from mars_dist.run.train import updates_per_epoch


def test_formula_matches_accelerates_own_syncs():
    """Count the updates accelerate really makes (sync_gradients inside `accumulate`) over the shard of process 0
    of a drop_last loader, for processes 1-3, grad_accum 1-4 and 1-13 batches."""
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(1, 1)
    for batches in range(1, 14):
        loader = torch.utils.data.DataLoader(torch.zeros(batches * 2, 1), batch_size=2, drop_last=True)
        for processes in (1, 2, 3):
            shard = prepare_data_loader(loader, num_processes=processes, process_index=0, put_on_device=False)
            for grad_accum in (1, 2, 3, 4):
                accelerator.gradient_accumulation_steps = grad_accum
                syncs = []
                for epoch in range(2):  # the count restarts with every epoch
                    syncs.append(0)
                    for _ in shard:
                        with accelerator.accumulate(model):
                            syncs[-1] += accelerator.sync_gradients
                expected = updates_per_epoch(batches, processes, grad_accum)
                if expected:  # 0 means refused: fewer micro-batches than one whole update
                    assert syncs == [expected, expected], (batches, processes, grad_accum, syncs)
                else:
                    assert batches // processes < grad_accum


@pytest.mark.slow
def test_epochs_and_step_schedule_land_on_the_right_updates(tmp_path):
    """40 images, micro-batch 8, grad_accum 2, one process: 5 batches = updates of 2, 2 and 1 batches, 3 updates per
    epoch (not 5 // 2 = 2). Two epochs are 6 updates; the 'step' schedule halves the lr every epoch = every 3."""
    from mars_dist import config
    from mars_dist.run.train import train

    cfg = config.load(None, [
        f"output_dir={tmp_path}", "data.image_size=32", "data.train_per_class=4", "data.val_per_class=1",
        "data.test_limit=20", "train.batch_size=8", "train.grad_accum=2", "train.epochs=2", "train.lr=0.01",
        "train.optimizer=sgd", "train.scheduler=step", "train.step_size_epochs=1", "train.step_gamma=0.5",
        "train.eval_every_epoch=false", "constraint.radius=1.0", "tracking.wandb_mode=disabled"])
    assert train(cfg)["updates"] == 6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/epoch" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["train/epoch"] for r in rows] == [0, 0, 0, 1, 1, 1]
    # train/lr is logged after the scheduler step: the lr of the next update, halved once 3 and 6 updates are done
    assert [r["train/lr"] for r in rows] == pytest.approx([0.01, 0.01, 0.005, 0.005, 0.005, 0.0025])
