"""Several `mars-dist train` runs in ONE launch (one process group, one Accelerator state): the DELTA tests check
two models per backend for the cost of one 2-process start. argv: a JSON file {output_dir: [overrides]}."""

import json
import sys

from accelerate.state import AcceleratorState, PartialState

from mars_dist import cli

if __name__ == "__main__":
    for out, overrides in json.loads(open(sys.argv[1]).read()).items():
        try:
            cli.main(["train", *overrides, f"output_dir={out}"])
        except SystemExit as done:
            if done.code:
                raise
        # the run ended its process group (accelerator.end_training): the next Accelerator starts a new one
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
