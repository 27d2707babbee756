"""`gridinr-train`: ns-train's command line, on one process or on every rank torchrun starts (CPU included).

    torchrun --standalone --nproc-per-node 2 gridinr-train gridinr-fit --data volume.nrrd
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 gridinr-train gridinr-fit ...

Why: nerfstudio's own launcher (`ns-train --machine.num-devices N`) spawns its processes itself, asserts CUDA and
knows nothing of schedulers' launchers. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) this joins torchrun's
process group (gloo on a CPU, NCCL on CUDA), lets rank 0 alone check the inputs, create the run folder and write
config.yml, hands every rank that same config, and runs nerfstudio's training loop (`train_loop`) for its rank,
with this rank's GPU and its share of the cores. Without torchrun (or with one process) it is ns-train.
Light at import: everything heavy is imported when a command runs.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any, Optional


def _parse_config():
    """The TrainerConfig from ns-train's command line (same subcommands, options and help)."""
    import tyro
    from nerfstudio.configs.config_utils import convert_markup_to_ansi
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion
    from nerfstudio.scripts import train as ns_train

    tyro.extras.set_accent_color("bright_yellow")
    return tyro.cli(AnnotatedBaseConfigUnion, description=convert_markup_to_ansi(ns_train.__doc__))


def _prepare_on_rank0(config) -> Any:
    """What ns-train does before launching, on rank 0: aliases, --load-config (read without running code), the
    input checks and timestamp, the printed and saved config. Returns the config, or the SystemExit to re-raise."""
    from nerfstudio.utils.rich_utils import CONSOLE

    from gridinr_nerfstudio.runs import RunConfigError, load_run_config

    try:
        if config.data:
            CONSOLE.log("Using --data alias for --data.pipeline.datamanager.data")
            config.pipeline.datamanager.data = config.data
        if config.prompt:
            CONSOLE.log("Using --prompt alias for --data.pipeline.model.prompt")
            config.pipeline.model.prompt = config.prompt
        if config.load_config:
            CONSOLE.log(f"Loading pre-set config from: {config.load_config}")
            config = load_run_config(config.load_config)
        config.set_timestamp()
        config.print_to_terminal()
        config.save_config()
        return config
    except RunConfigError as error:
        return SystemExit(f"gridinr-train: error: {error}")
    except SystemExit as error:
        return error


def _join_local_groups(local_world_size: int) -> None:
    """nerfstudio's per-machine process groups (its `comms` helpers ask them), one per machine, as its launcher
    makes them: every rank creates every group."""
    import torch.distributed as dist
    from nerfstudio.utils import comms

    world, rank = dist.get_world_size(), dist.get_rank()
    for machine in range(world // local_world_size):
        group = dist.new_group(list(range(machine * local_world_size, (machine + 1) * local_world_size)))
        if rank // local_world_size == machine:
            comms.LOCAL_PROCESS_GROUP = group


def train_rank(place) -> int:
    """One rank of a torchrun job: join, agree on one config (rank 0's), train, leave. Returns the exit status."""
    from nerfstudio.scripts.train import train_loop
    from nerfstudio.utils import profiler
    from nerfstudio.utils.rich_utils import CONSOLE

    from gridinr_nerfstudio import distributed

    config = _parse_config()  # every rank parses the same command line (--help ends every rank here)
    distributed.start(place, config.machine.device_type)
    _join_local_groups(place.local_world_size)
    if place.rank != 0:  # one copy of the logs and warnings: rank 0's (errors and tracebacks still reach stderr)
        CONSOLE.quiet = True
        logging.getLogger("gridinr_nerfstudio").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
    outcome = None
    if place.rank == 0:
        machine = config.machine
        if machine.num_devices * machine.num_machines > 1:
            outcome = SystemExit("gridinr-train: error: under torchrun the processes come from torchrun "
                                 "(--nproc-per-node, --nnodes): leave --machine.num-devices and "
                                 "--machine.num-machines at 1")
        else:
            outcome = _prepare_on_rank0(config)
    outcome = distributed.broadcast_object(outcome)  # the saved config, or the one-line refusal, for every rank
    if isinstance(outcome, SystemExit):
        distributed.stop()
        if place.rank == 0:
            raise outcome
        return outcome.code if isinstance(outcome.code, int) else 1
    try:
        train_loop(place.local_rank, place.world_size, outcome, place.rank)
    finally:
        if place.rank == 0:
            profiler.flush_profiler(outcome.logging)
    distributed.stop()
    return 0


def main(argv: Optional[list] = None) -> None:
    """The console script: ns-train alone, one rank of a data-parallel run under torchrun."""
    from gridinr_nerfstudio.distributed import torchrun_rank

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    place = torchrun_rank()
    if place is None or place.world_size == 1:
        from nerfstudio.scripts.train import entrypoint

        entrypoint()
        return
    sys.exit(train_rank(place))


if __name__ == "__main__":
    main()
