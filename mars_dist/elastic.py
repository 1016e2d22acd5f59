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
