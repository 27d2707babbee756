"""nerfstudio method entry points `gridinr-fit` (stage 1) and `gridinr-edit` (stage 2), with their trainer configs.

Like LERF's `lerf_config.py`: every MethodSpecification and the trainer/optimizer/scheduler configs they use.
nerfstudio loads every registered method when any `ns-*` command starts, so an import error here breaks
ns-train for every method: keep this module to configuration (no open_clip, lpips or matplotlib at import;
a test checks `sys.modules`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Type

import torch
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig, OptimizerConfig
from nerfstudio.engine.schedulers import Scheduler, SchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification

from gridinr_nerfstudio import distributed
from gridinr_nerfstudio.device_defaults import device_defaults
from gridinr_nerfstudio.fields.hash_grid.optim import HashGridAdam
from gridinr_nerfstudio.stages.base_pipeline import StagePipelineConfig
from gridinr_nerfstudio.stages.edit.pipeline import EditPipelineConfig
from gridinr_nerfstudio.stages.fit.pipeline import FitPipelineConfig
from gridinr_nerfstudio.trainer import GridINRTrainer


@dataclass
class GridINRTrainerConfig(TrainerConfig):
    """Records the run folder in the pipeline config, so evaluations (also ns-eval) write the CSV next to the run.

    Trains with `GridINRTrainer`: atomic checkpoints, and `--load-dir` resumes the same run to the same end.
    The run's length is `max_num_iterations` alone: schedules without `max_steps` and the parts that follow the
    run (coarse-to-fine levels, the coarse sampling phase) read it when training sets up.
    """

    _target: Type = field(default_factory=lambda: GridINRTrainer)
    final_evaluation: bool = True
    """End the run with a full evaluation (a metrics.csv row; stage 2: reference/edit pairs), once, whatever
    --steps-per-eval-all-images and --vis are. False only to time training alone (gridinr-bench memory)."""
    cpu_threads: Literal["adaptive", "fixed"] = "adaptive"
    """On a CPU, one process: "adaptive" measures now and then whether one thread, our kernels on all threads, or
    everything on all threads trains fastest, and keeps the fastest (thread_policy.py: one busy process beside a run
    on 2 cores made all threads 3-5x slower than one, an idle machine makes them ~1.7x faster); "fixed": torch's
    thread count throughout (OMP_NUM_THREADS), bit-for-bit repeatable runs."""

    def set_experiment_name(self) -> None:
        if self.experiment_name is None and self.pipeline.datamanager.data is None:
            data = self.pipeline.datamanager.dataparser.data
            self.experiment_name = (data.parent if data.is_file() else data).stem or "volume"
        super().set_experiment_name()

    def set_timestamp(self) -> None:
        """ns-train's first call: bad inputs end here in one line, before the config dump and the run folder;
        a resume (`--load-dir`) is pointed at the run it continues (stages/resume.py)."""
        from gridinr_nerfstudio.stages.validation import exit_on_bad_inputs

        refuse_cpu_multiprocess_launch(self)
        method_defaults = METHOD_DEFAULTS.get(self.method_name or "")
        exit_on_bad_inputs(self, method_defaults() if method_defaults is not None else None)
        super().set_timestamp()

    def save_config(self) -> None:
        """Called by ns-train just before training (once, before any rank starts): fill in what follows from the
        final CLI values (the run folder; the edit stage adopts its stage-1 run here), then write config.yml."""
        pipeline: StagePipelineConfig = self.pipeline  # both stages' pipeline configs declare `prepare_run`
        pipeline.prepare_run(self)
        super().save_config()

    def is_viewer_enabled(self) -> bool:
        """The viewer runs on rank 0 only (nerfstudio would also start one on every other machine's first rank)."""
        return super().is_viewer_enabled() and distributed.is_main()

    def setup(self, **kwargs):
        """The trainer, with schedules that end with the run: a LogLinearDecayScheduler without `max_steps` decays
        over `max_num_iterations` (resolved on a copy: config.yml keeps "the run's length")."""
        config = copy.copy(self)
        config.optimizers = copy.deepcopy(self.optimizers)
        for group in config.optimizers.values():
            scheduler = group.get("scheduler")
            if isinstance(scheduler, LogLinearDecaySchedulerConfig) and scheduler.max_steps is None:
                scheduler.max_steps = self.max_num_iterations
        return config._target(config, **kwargs)


def refuse_cpu_multiprocess_launch(config: TrainerConfig) -> None:
    """nerfstudio's launcher of several processes asserts CUDA: on a CPU say in one line what works instead."""
    machine = config.machine
    if machine.device_type != "cuda" and machine.num_devices * machine.num_machines > 1:
        raise SystemExit(f"--machine.num-devices {machine.num_devices} needs CUDA (nerfstudio's launcher): on a "
                         f"{machine.device_type}, start the processes with torchrun, e.g. torchrun --standalone "
                         f"--nproc-per-node {machine.num_devices} gridinr-train {config.method_name} ... (README, "
                         "\"Scaling out\")")


@dataclass
class HashGridAdamOptimizerConfig(OptimizerConfig):
    """Adam for hash tables: lazy (HashGridAdam: only the entries a batch touched move) or dense fused torch Adam.

    `mode` "auto" takes the default of the device the table lives on (device_defaults.py); both use betas
    (0.9, 0.99) like instant-ngp.
    """

    _target: Type = HashGridAdam
    mode: Literal["auto", "lazy", "dense"] = "auto"
    """"lazy" (HashGridAdam: fused C++ pass on a CPU, Triton pass on CUDA), "dense" (torch.optim.Adam, fused)."""

    def setup(self, params) -> torch.optim.Optimizer:
        params = list(params)
        mode = self.mode
        if mode == "auto":
            mode = device_defaults(params[0].device if params else "cpu").hash_optimizer
        if mode == "dense":
            return torch.optim.Adam(params, lr=self.lr, eps=self.eps, betas=(0.9, 0.99), fused=True)
        if mode != "lazy":
            raise ValueError(f"HashGridAdamOptimizerConfig.mode must be 'auto', 'lazy' or 'dense', got {mode!r}")
        return HashGridAdam(params, lr=self.lr, eps=self.eps, betas=(0.9, 0.99))


def default_machine() -> MachineConfig:
    """CUDA when present, else the CPU (nerfstudio's own default assumes CUDA)."""
    return MachineConfig(device_type="cuda" if torch.cuda.is_available() else "cpu")


def loopback_viewer() -> ViewerConfig:
    """The viewer on 127.0.0.1 (nerfstudio's default 0.0.0.0 lets anyone who reaches the port drive a run);
    `--viewer.websocket-host 0.0.0.0` opts in to the network (README, "Viewer access")."""
    return ViewerConfig(websocket_host="127.0.0.1")


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam with torch's fused kernel (CPU and CUDA): one pass over the big hash table instead of several."""

    _target: Type = torch.optim.Adam
    fused: Optional[bool] = True


@dataclass
class LogLinearDecaySchedulerConfig(SchedulerConfig):
    """Learning rate decaying exponentially from the optimizer's lr to `lr_final` over `max_steps`."""

    _target: Type = field(default_factory=lambda: LogLinearDecayScheduler)
    lr_final: float = 1e-4
    max_steps: Optional[int] = None
    """Steps of the decay; None: the run's --max-num-iterations."""


class LogLinearDecayScheduler(Scheduler):
    """nerfstudio's ExponentialDecayScheduler without warm-up, returning Python floats.

    nerfstudio's version returns numpy scalars, which end up in the checkpoint's scheduler state and make
    `torch.load(weights_only=True)` (torch's default, used by ns-eval and ns-viewer) refuse the file.
    """

    config: LogLinearDecaySchedulerConfig

    def get_scheduler(self, optimizer: torch.optim.Optimizer, lr_init: float) -> torch.optim.lr_scheduler.LRScheduler:
        if self.config.max_steps is None:
            raise ValueError("LogLinearDecaySchedulerConfig.max_steps is None: GridINRTrainerConfig.setup sets it to "
                             "the run's --max-num-iterations; set it yourself outside a trainer")
        ratio = self.config.lr_final / lr_init

        def multiplier(step: int) -> float:
            progress = min(max(step / self.config.max_steps, 0.0), 1.0)
            return float(math.exp(math.log(ratio) * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=multiplier)


FIT_ITERATIONS = 1000
CPU_FIT_ITERATIONS = 2000
EDIT_ITERATIONS = 1000
PARTS_LR = 5e-3


def use_cpu_field_defaults(config: GridINRTrainerConfig) -> GridINRTrainerConfig:
    """On a CPU the field defaults to 8 levels x 2 features and one hidden layer of 16 (instant-ngp's 16 x 2 and
    2 x 64 MLP elsewhere), trained for CPU_FIT_ITERATIONS (about 60 s on 2 cores). Chosen by `gridinr-bench sweep`
    at 60 s on four volumes, a brain MRI among them (docs/cpu_profiles.md): mean 60.4 dB and at most 0.9 dB below
    the best variant of any volume, against 55.4 dB and 9.8 dB (on the MRI) for the previous 8 x 1 linear default;
    its levels are switched on from coarse to fine over the first 10% of the steps (+2.2 to +12.1 dB on all four
    volumes at 60 CPU s)."""
    if config.machine.device_type == "cpu":
        field_settings = config.pipeline.model.field
        field_settings.num_levels, field_settings.features_per_level = 8, 2
        field_settings.num_hidden_layers, field_settings.hidden_dim = 1, 16
        field_settings.coarse_to_fine = 0.1
        config.max_num_iterations = config.steps_per_eval_all_images = CPU_FIT_ITERATIONS
        config.steps_per_save = config.steps_per_eval_image = config.steps_per_eval_batch = CPU_FIT_ITERATIONS // 2
    return config


def fit_trainer_config() -> GridINRTrainerConfig:
    """Stage 1 defaults, measured on a 2-core CPU (README, "Benchmarks"; docs/cpu_profiles.md)."""
    schedule = LogLinearDecaySchedulerConfig(lr_final=1e-4)  # over the run's length
    return use_cpu_field_defaults(GridINRTrainerConfig(
        method_name="gridinr-fit",
        max_num_iterations=FIT_ITERATIONS,
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_eval_all_images=FIT_ITERATIONS,
        steps_per_save=500,
        save_only_latest_checkpoint=True,
        mixed_precision=False,
        machine=default_machine(),
        viewer=loopback_viewer(),
        pipeline=FitPipelineConfig(),
        optimizers={
            "encoding": {
                "optimizer": HashGridAdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": schedule,
            },
            "mlp": {
                "optimizer": FusedAdamOptimizerConfig(lr=1e-2, eps=1e-15),
                "scheduler": schedule,
            },
        },
        vis="viewer",
    ))


gridinr_fit = MethodSpecification(
    config=fit_trainer_config(),
    description="Stage 1: fit a multi-resolution hash-grid INR (xyz -> value) to a scientific volume.",
)


def edit_trainer_config() -> GridINRTrainerConfig:
    """Stage 2 defaults of the original design: lr 5e-4, 1000 iterations, renders every 20 steps."""
    return GridINRTrainerConfig(
        method_name="gridinr-edit",
        max_num_iterations=EDIT_ITERATIONS,
        steps_per_eval_batch=EDIT_ITERATIONS + 1,
        steps_per_eval_image=200,
        steps_per_eval_all_images=EDIT_ITERATIONS,
        steps_per_save=200,
        save_only_latest_checkpoint=True,
        mixed_precision=False,
        machine=default_machine(),
        viewer=loopback_viewer(),
        pipeline=EditPipelineConfig(),
        optimizers={
            "transfer_mlp": {  # the warm-start MLP: trains only in runs without targets (pixel term alone)
                "optimizer": FusedAdamOptimizerConfig(lr=5e-4, eps=1e-15),
                "scheduler": None,
            },
            "transfer_parts": {  # each target's residual (starts at zero: a larger step than the MLP's)
                "optimizer": FusedAdamOptimizerConfig(lr=PARTS_LR, eps=1e-15),
                "scheduler": None,
            },
        },
        vis="viewer",
    )


gridinr_edit = MethodSpecification(
    config=edit_trainer_config(),
    description="Stage 2: edit a fitted volume's look (transfer MLP) with CLIP and pixel losses through DVR.",
)

EDIT_FAST_ITERATIONS = 100


def edit_fast_trainer_config() -> GridINRTrainerConfig:
    """Stage 2 in minutes on a CPU with a ViT-B-16 (`gridinr-bench edit`): renders at half the reference size,
    one CLIP crop per step, the directional loss (changes only what the prompt asks for, so few steps suffice),
    a 10x learning rate, few iterations, intermediate renders twice per run."""
    config = edit_trainer_config()
    config.method_name = "gridinr-edit-fast"
    config.max_num_iterations = EDIT_FAST_ITERATIONS
    config.steps_per_eval_image = config.steps_per_eval_batch = EDIT_FAST_ITERATIONS + 1
    config.steps_per_eval_all_images = config.steps_per_save = EDIT_FAST_ITERATIONS
    pipeline = config.pipeline
    pipeline.steps_per_render = EDIT_FAST_ITERATIONS // 2
    pipeline.datamanager.train_image_scale = 0.5
    pipeline.model.clip_crops = 1
    pipeline.model.directional = True
    config.optimizers["transfer_mlp"]["optimizer"].lr = 5e-3
    return config


gridinr_edit_fast = MethodSpecification(
    config=edit_fast_trainer_config(),
    description="Stage 2, fast profile: a CLIP edit in minutes on a CPU (half-size renders, 1 crop, directional loss).",
)


METHOD_DEFAULTS = {"gridinr-fit": fit_trainer_config, "gridinr-edit": edit_trainer_config,
                   "gridinr-edit-fast": edit_fast_trainer_config}
"""Each method's default config (a resumed run takes its own value for an option left at its default)."""
