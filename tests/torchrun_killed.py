"""`gridinr-train` for one torchrun rank that dies by SIGKILL when it reaches step KILL_AT_STEP (tests only).

Every rank first waits for the others at that step (a barrier), so rank 0 has finished the checkpoint it wrote before
it, as a job killed by its scheduler a little later would have; then each rank kills itself (nothing is cleaned up,
nothing is flushed: a real kill).
"""

from __future__ import annotations

import os
import signal

from nerfstudio.engine.trainer import Trainer

from gridinr_nerfstudio import distributed
from gridinr_nerfstudio.scripts.train import main

KILL_AT_STEP = int(os.environ["KILL_AT_STEP"])
train_iteration = Trainer.train_iteration


def dies_at_the_kill_step(self, step):
    if step == KILL_AT_STEP:
        distributed.barrier()
        os.kill(os.getpid(), signal.SIGKILL)
    return train_iteration(self, step)


Trainer.train_iteration = dies_at_the_kill_step

if __name__ == "__main__":
    main()
