"""nerfstudio method entry points: `gridinr-fit` (stage 1) and `gridinr-edit` (stage 2).

nerfstudio loads every registered method when any `ns-*` command starts, so an import error here breaks
ns-train for every method: keep this module to configuration only (tests import it).
"""

from __future__ import annotations

from nerfstudio.plugins.types import MethodSpecification

from gridinr_nerfstudio.edit_pipeline import GridINREditPipelineConfig
from gridinr_nerfstudio.fit_pipeline import GridINRFitPipelineConfig
from gridinr_nerfstudio.trainer_config import (
    FusedAdamOptimizerConfig,
    GridINRTrainerConfig,
    HashGridAdamOptimizerConfig,
    LogLinearDecaySchedulerConfig,
    default_machine,
)
from gridinr_nerfstudio.volume_datamanager import VolumeDataManagerConfig

FIT_ITERATIONS = 1000
EDIT_ITERATIONS = 1000


def fit_trainer_config() -> GridINRTrainerConfig:
    """Stage 1 defaults, measured on a 2-core CPU (README, "Benchmarks")."""
    schedule = LogLinearDecaySchedulerConfig(lr_final=1e-4, max_steps=FIT_ITERATIONS)
    return GridINRTrainerConfig(
        method_name="gridinr-fit",
        max_num_iterations=FIT_ITERATIONS,
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_eval_all_images=FIT_ITERATIONS,
        steps_per_save=500,
        save_only_latest_checkpoint=True,
        mixed_precision=False,
        machine=default_machine(),
        pipeline=GridINRFitPipelineConfig(
            datamanager=VolumeDataManagerConfig(max_iterations=FIT_ITERATIONS),
        ),
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
    )


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
        pipeline=GridINREditPipelineConfig(),
        optimizers={
            "transfer_mlp": {
                "optimizer": FusedAdamOptimizerConfig(lr=5e-4, eps=1e-15),
                "scheduler": None,
            },
        },
        vis="viewer",
    )


gridinr_edit = MethodSpecification(
    config=edit_trainer_config(),
    description="Stage 2: edit a fitted volume's look (transfer MLP) with CLIP and pixel losses through DVR.",
)
