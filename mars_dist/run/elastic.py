"""A rank lost mid-run (killed, OOM, hung node): end the whole job within a bound and ask for a requeue.

The bound comes from the collective timeout (`train.collective_timeout_s`, passed to the process group by
sharding/accelerate_setup.py): a surviving rank's next all-reduce fails at once when the peer's sockets close
(killed process) or after the timeout (hung peer, lost node). The CLI then calls `report_lost_rank`: the rank writes
OUTPUT_DIR/rank_lost.json and exits EXIT_RANK_LOST. The torchrun agent in `accelerate launch` tears the rest of its
group down and exits 1 (it does not pass the code on), so launch/slurm/common.sh looks for the marker, as for
preempted.json, and requeues; the next `resume: auto` continues from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

EXIT_RANK_LOST = 98
MARKER = "rank_lost.json"
# What torch raises in a survivor: DistError subclasses (DistBackendError, DistNetworkError) on NCCL / store
# failures and timeouts; gloo raises plain RuntimeErrors naming its transport ("Connection reset by peer",
# "Connection closed by peer", "Application timeout caused pair closure", "Timed out waiting ...").
_GLOO_SIGNS = ("gloo/transport", "connection reset by peer", "connection closed by peer", "timeout caused pair",
               "timed out", "broken pipe")


def is_lost_rank(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return type(err) is RuntimeError and any(sign in str(err).lower() for sign in _GLOO_SIGNS)


def report_lost_rank(output_dir: str | Path, err: BaseException) -> int:
    """Write the marker (atomically: several survivors may write it at once) and return the exit code."""
    rank = os.environ.get("RANK", "0")
    first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    out = Path(output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{MARKER}.{rank}"
        tmp.write_text(json.dumps({"rank": int(rank), "time": time.time(), "error": first}))
        tmp.replace(out / MARKER)
    except OSError:
        pass  # the exit code still says it
    print(f"mars-dist train: rank {rank} lost a peer ({first}); exiting {EXIT_RANK_LOST} so that the job is "
          f"requeued and resumed from the last checkpoint", file=sys.stderr)
    return EXIT_RANK_LOST


# ---- resuming under another data-parallel world size ----

def check_world_size(saved: dict, cfg, accelerator, ckpt) -> bool:
    """What a resume under another batch layout can carry over; called before anything heavy is built. Returns True
    when the checkpoint must be loaded through DeepSpeed's universal checkpoint (ZeRO under another world size).

    DDP / one process: the model and optimizer are saved whole, accelerate's per-rank RNG files are optional: any
    world size loads. DeepSpeed ZeRO: one optimizer partition per saving rank, re-cut by DeepSpeed's own universal
    checkpoint (sharding/zero_universal.py); what that cannot carry is refused here, naming it. FSDP2: accelerate
    saves SHARDED_STATE_DICT through torch.distributed.checkpoint, which reshards on load by itself.
    A changed global batch is refused where the LR schedule counts updates (an update now holds another number of
    samples, so the schedule would no longer match the data seen)."""
    from mars_dist.run.checkpoint import CheckpointError
    from mars_dist.run.resume_guard import layout

    old, new = saved.get("layout") or {}, layout(cfg, accelerator.num_processes)
    if old.get("global_batch") not in (None, new["global_batch"]):
        counts = [f"train.scheduler={cfg.train.scheduler}"] if cfg.train.scheduler != "constant" else []
        if cfg.train.warmup_steps and saved.get("step", 0) < cfg.train.warmup_steps:
            counts.append(f"train.warmup_steps={cfg.train.warmup_steps} (at update {saved.get('step')})")
        if counts:
            keep = old["global_batch"] / (new["micro_batch"] * new["world_size"])
            hint = (f"train.grad_accum={int(keep)} keeps it with {new['world_size']} process(es) x micro-batch "
                    f"{new['micro_batch']}" if keep == int(keep) and keep >= 1 else
                    "choose train.batch_size x processes x train.grad_accum to match it")
            raise CheckpointError(
                f"checkpoint {ckpt} was made with global batch {old['global_batch']}, this run has "
                f"{new['global_batch']} ({new['world_size']} process(es) x micro-batch {new['micro_batch']} x "
                f"grad_accum {new['grad_accum']}), and {' and '.join(counts)} counts updates: refusing to resume (the schedule "
                f"would no longer match the samples seen). Keep the global batch ({hint}) or use train.scheduler="
                f"constant")
    if old.get("world_size") in (None, accelerator.num_processes):
        return False
    if getattr(accelerator.state, "deepspeed_plugin", None) is None:
        return False
    from mars_dist.sharding.zero_universal import unsupported

    why = unsupported(cfg.train.optimizer, cfg.train.amsgrad)
    if why:
        raise CheckpointError(
            f"checkpoint {ckpt} holds DeepSpeed ZeRO partitions of {old['world_size']} ranks; this run has "
            f"{accelerator.num_processes}: {why}; resume with {old['world_size']} processes")
    return True


def position_for_layout(saved: dict, micro_batch: int, world_size: int, note, global_batch: int | None = None) -> int:
    """The saved position in the epoch (micro-batches per process) under this run's layout. The seedable sampler
    deals one global order of samples out in rounds of micro_batch x world_size, so the same number of samples
    consumed is the same global sample: exact when a round of the new layout divides it (always when the global
    batch is unchanged: checkpoints sit at update boundaries), else the next round below, with a note."""
    batch = saved["batch_in_epoch"]
    old = saved.get("layout")
    if not old or (old["micro_batch"], old["world_size"]) == (micro_batch, world_size):
        return batch
    samples = batch * old["micro_batch"] * old["world_size"]
    new_round = micro_batch * world_size
    if global_batch is not None and old.get("global_batch") not in (None, global_batch):
        note(f"resume: global batch {old['global_batch']} -> {global_batch}: continuing at the same epoch position "
             f"(epoch {saved['epoch']}, sample {samples // new_round * new_round}), not at the same update")
    if samples % new_round:
        note(f"resume: {samples} samples of epoch {saved['epoch']} were consumed, not a whole number of rounds of "
             f"{micro_batch} x {world_size}: continuing at sample {samples // new_round * new_round} of the epoch "
             f"(same epoch position, {samples % new_round} samples seen again)")
    return samples // new_round
