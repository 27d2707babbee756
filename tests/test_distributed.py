"""Data-parallel training on torch.distributed: two CPU processes (gloo) against one process on the same points.

Three levels: the sampler's sharding of one global batch (no processes), one step of both stages on two gloo ranks
spawned with torch.multiprocessing against one process on the union of their batches, and real `gridinr-train`
runs under torchrun (writes, kill and resume, the run read by stage 2, gridinr-export and ns-eval).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_runs import run_ns_train, shrink_dataparser, short_run

from gridinr_nerfstudio.data.volume_io import open_volume, scene_aabb
from gridinr_nerfstudio.stages.base_pipeline import combine_rank_averages
from gridinr_nerfstudio.stages.fit import point_sampler
from gridinr_nerfstudio.stages.fit.point_sampler import BatchShard, VolumePointSampler
from gridinr_nerfstudio.stages.fit.sequence import SequencePointSampler

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory) -> Path:
    """A 24^3 float32 volume: a blob plus a texture, so a few steps move the PSNR."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, 24),) * 3, indexing="ij")
    values = np.exp(-4 * (x**2 + y**2 + z**2)) + 0.3 * np.sin(5 * x) * np.cos(3 * y) * np.cos(2 * z)
    path = tmp_path_factory.mktemp("volume") / "blob24.npy"
    np.save(path, values.astype(np.float32))
    return path


# 1. One global batch, split by rows.

def _split_batch(batch, count: int, fraction: float):
    """(voxel rows, continuous rows) of one rank's batch of `count` points."""
    continuous = int(fraction * count)
    return [part[: count - continuous] for part in batch], [part[count - continuous:] for part in batch]


@pytest.mark.parametrize("feistel", [False, True])
def test_ranks_draw_disjoint_rows_of_the_single_process_batch(small_volume, monkeypatch, feistel):
    """Two ranks of B points hand out, together, exactly the points one process draws with 2B: across epoch
    boundaries and the coarse phase; every sampler ends in the same state (one state to save)."""
    if feistel:
        monkeypatch.setattr(point_sampler, "RANDPERM_MAX_VOXELS", 16)
    volume, _ = small_volume  # 105 voxels: a global batch of 60 voxels crosses an epoch every other step
    options = dict(continuous_fraction=0.25, subsample_factor=2, coarse_steps=1, seed=4)
    single = VolumePointSampler(volume, scene_aabb(volume), **options)
    ranks = [VolumePointSampler(volume, scene_aabb(volume), shard=BatchShard(rank, 2), **options) for rank in range(2)]
    for step in range(7):
        whole = single.batch(80, step)
        parts = [sampler.batch(40, step) for sampler in ranks]
        if step == 0:  # coarse phase: sub-grid voxels, rows in order of the global draw before sorting
            together = torch.cat([parts[0][0], parts[1][0]])
            assert torch.equal(together[together[:, 0].argsort(stable=True)].unique(dim=0), whole[0].unique(dim=0))
            continue
        (whole_voxels, whole_continuous) = _split_batch(whole, 80, 0.25)
        rank_splits = [_split_batch(part, 40, 0.25) for part in parts]
        voxels = torch.cat([split[0][0] for split in rank_splits])
        assert torch.equal(voxels.unique(dim=0), whole_voxels[0].unique(dim=0)) and len(voxels) == len(whole_voxels[0])
        for index in range(2):  # continuous points: the global stream's rows, rank 0 first
            assert torch.equal(torch.cat([split[1][index] for split in rank_splits]), whole_continuous[index])
    states = [sampler.get_state() for sampler in (single, *ranks)]
    for state in states[1:]:
        assert state["epoch_position"] == states[0]["epoch_position"]
        assert torch.equal(state["generator"], states[0]["generator"])


def test_an_epoch_over_three_ranks_visits_every_voxel_once(small_volume):
    volume, _ = small_volume
    ranks = [VolumePointSampler(volume, scene_aabb(volume), shard=BatchShard(rank, 3), seed=1) for rank in range(3)]
    seen = torch.cat([sampler.epoch_indices(count) for count in (20, 15) for sampler in ranks])  # 3 x 35 = 105
    assert torch.equal(seen.long().sort().values, torch.arange(105))
    assert len({sampler.epoch_position for sampler in ranks}) == 1


def test_sequence_ranks_split_every_step(small_volume):
    volume, _ = small_volume

    def sequence(shard):
        return SequencePointSampler([VolumePointSampler(volume, scene_aabb(volume), seed=seed, shard=shard)
                                     for seed in (0, 1000)])

    single, ranks = sequence(BatchShard()), [sequence(BatchShard(rank, 2)) for rank in range(2)]
    whole = single.batch(40, 0)
    parts = [sampler.batch(20, 0) for sampler in ranks]
    for time in (0.0, 1.0):
        together = torch.cat([points[times == time] for points, _, times in parts])
        assert torch.equal(together.unique(dim=0), whole[0][whole[2] == time].unique(dim=0))


def test_rank_averages_combine_to_the_statistics_of_all_views():
    values = torch.tensor([31.0, 28.5, 33.2, 29.9, 30.4])
    mean_std = {"psnr": float(values.mean())}
    parts = []
    for chunk in (values[:2], values[2:4], values[4:]):
        std, mean = torch.std_mean(chunk)
        parts.append((len(chunk), {"psnr": float(mean), "psnr_std": float(std)}))
    combined = combine_rank_averages(parts, with_std=True)
    std, mean = torch.std_mean(values)
    assert combined["psnr"] == pytest.approx(float(mean)) and combined["psnr_std"] == pytest.approx(float(std))
    assert combine_rank_averages([(5, mean_std), (0, {})]) == mean_std  # a rank without views adds nothing


# 2. One step of two gloo ranks equals one process on both ranks' batches.

FIT_BATCH = 512  # per rank: a quarter error-weighted, a quarter of the rest continuous (whole numbers of points)


def fit_config(data: Path, output: Path, batch: int):
    from gridinr_nerfstudio.gridinr_config import fit_trainer_config

    config = short_run(fit_trainer_config(), output, "spawned", iterations=3)
    shrink_dataparser(config.pipeline.datamanager.dataparser, output.parent / "references", image_size=16)
    config.pipeline.datamanager.dataparser.data = data
    manager = config.pipeline.datamanager
    manager.batch_size, manager.error_weighted_fraction = batch, 0.25
    field = config.pipeline.model.field
    field.num_levels, field.log2_hashmap_size, field.max_resolution, field.hidden_dim = 4, 12, 32, 16
    field.coarse_to_fine = 0.5
    return config


def edit_config(stage1: Path, output: Path, views: int, clip):
    from gridinr_nerfstudio.gridinr_config import edit_trainer_config

    config = short_run(edit_trainer_config(), output, "spawned", iterations=3)
    config.pipeline.stage1_config = stage1
    config.pipeline.datamanager.views_per_step = views
    model = config.pipeline.model
    model.hidden_dim, model.lam_clip, model.lam_pix, model.clip_crops = 32, 1.0, 0.1, 1
    model.clip_model, model.clip_weights = clip[0], Path(clip[1])
    return config


def trainer_for(config, rank: int = 0, world: int = 1):
    """nerfstudio's Trainer.setup without viewer and writers: pipeline (DDP when world > 1), optimizers, callbacks."""
    from nerfstudio.engine.callbacks import TrainingCallbackAttributes

    torch.manual_seed(0)  # the same initial field in every process (DDP also hands rank 0's to the others)
    trainer = config.setup(local_rank=rank, world_size=world)
    trainer.pipeline = config.pipeline.setup(device="cpu", test_mode="val", world_size=world, local_rank=rank,
                                             grad_scaler=trainer.grad_scaler)
    trainer.optimizers = trainer.setup_optimizers()
    trainer.callbacks = trainer.pipeline.get_training_callbacks(TrainingCallbackAttributes(
        optimizers=trainer.optimizers, grad_scaler=trainer.grad_scaler, pipeline=trainer.pipeline, trainer=trainer))
    if config.method_name != "gridinr-fit":  # crops that do not depend on which process draws them
        clip_losses = [item.clip_loss for item in trainer.pipeline.model.scored.values() if item.clip_loss is not None]
        assert clip_losses, "the edit has a CLIP target"
        for clip_loss in clip_losses:
            clip_loss.augment = False
    return trainer


def train_step(trainer, step: int) -> None:
    """One step as nerfstudio's loop makes it (callbacks around train_iteration). Stage 2 renders deterministically
    (eval mode: no stratified jitter), so one process and two ranks render the same pixels."""
    from nerfstudio.engine.callbacks import TrainingCallbackLocation

    trainer.pipeline.train()
    if trainer.config.method_name != "gridinr-fit":
        trainer.pipeline.eval()
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
    trainer.train_iteration(step)
    for callback in trainer.callbacks:
        callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)


def trained(trainer) -> dict:
    return {name: value.detach().clone() for name, value in trainer.pipeline.model.named_parameters()
            if value.requires_grad and value.numel() > 0}


def digest(parameters: dict) -> str:
    sha = hashlib.sha256()
    for name, value in sorted(parameters.items()):
        sha.update(name.encode() + value.numpy().tobytes())
    return sha.hexdigest()


def _rank_worker(rank: int, world: int, rendezvous: str, output: str, data: str, stage1: str, clip: tuple) -> None:
    """One gloo rank: three steps of each stage; parameters after the first, digests after each, saved to a file."""
    from tiny_models import register_tiny_clip

    torch.set_num_threads(1)
    register_tiny_clip(Path(clip[1]).parent / "configs")
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        from gridinr_nerfstudio import distributed

        results = {}
        for stage, config in (("fit", fit_config(Path(data), Path(output) / "fit", FIT_BATCH)),
                              ("edit", edit_config(Path(stage1), Path(output) / "edit", 1, clip))):
            trainer = trainer_for(config, rank, world)
            train_step(trainer, 0)
            first = trained(trainer)
            results[stage] = {"first": first}
            if stage == "fit":  # the block errors after the first step's report (summed over the ranks)
                results[stage]["errors"] = trainer.pipeline.datamanager.error_sampler.error.clone()
            digests = [digest(first)]
            for step in (1, 2):
                train_step(trainer, step)
                digests.append(digest(trained(trainer)))
            results[stage]["digests"] = distributed.all_gather_objects(digests)
        torch.save(results, Path(output) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_step_like_one_process_on_both_batches(volume_file, tiny_fit_run, tiny_clip, tmp_path):
    """Stage 1 (error-weighted batches: their errors summed over the ranks) and stage 2 (pixel and CLIP terms):
    parameters after one step of 2 ranks x B equal one process's on 2B within 1e-6; the ranks' parameters are
    bitwise equal after every step."""
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), str(volume_file), str(tiny_fit_run),
                                 tiny_clip), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    references = {
        "fit": trainer_for(fit_config(volume_file, tmp_path / "single-fit", 2 * FIT_BATCH)),
        "edit": trainer_for(edit_config(tiny_fit_run, tmp_path / "single-edit", 2, tiny_clip)),
    }
    for stage, reference in references.items():
        train_step(reference, 0)
        expected = trained(reference)
        for rank in ranks:
            digests = rank[stage]["digests"]
            assert digests[0] == digests[1], stage  # bitwise equal on both ranks after each of the three steps
            for name, value in expected.items():
                moved = (value - rank[stage]["first"][name]).abs().max()
                assert moved <= 1e-6, (stage, name, float(moved))
    start = trainer_for(fit_config(volume_file, tmp_path / "untrained", 2 * FIT_BATCH))
    assert any((trained(start)[name] - value).abs().max() > 1e-4 for name, value in ranks[0]["fit"]["first"].items())
    reference_errors = references["fit"].pipeline.datamanager.error_sampler.error
    torch.testing.assert_close(ranks[0]["fit"]["errors"], reference_errors, rtol=1e-5, atol=1e-9)
    assert torch.equal(ranks[0]["fit"]["errors"], ranks[1]["fit"]["errors"])


# 3. gridinr-train under torchrun.

RUN_STEPS, SAVE_EVERY, KILL_AT = 12, 4, 6


def fit_arguments(data: Path, output: Path, batch: int = 256) -> list:
    """A gridinr-fit command line for a tiny run of RUN_STEPS steps (checkpoints and evaluations every SAVE_EVERY)."""
    every = str(SAVE_EVERY)
    return [
        "gridinr-fit", "--data", str(data), "--output-dir", str(output), "--timestamp", "run", "--vis", "tensorboard",
        "--max-num-iterations", str(RUN_STEPS), "--steps-per-save", every, "--save-only-latest-checkpoint", "False",
        "--steps-per-eval-batch", every, "--steps-per-eval-image", every, "--steps-per-eval-all-images", every,
        "--pipeline.datamanager.batch-size", str(batch),
        "--pipeline.datamanager.dataparser.num-train-views", "4", "--pipeline.datamanager.dataparser.num-eval-views", "3",
        "--pipeline.datamanager.dataparser.image-size", "16", "--pipeline.datamanager.dataparser.render.num-samples", "32",
        "--pipeline.datamanager.dataparser.cache-dir", str(output.parent / "references"),
        "--pipeline.model.field.num-levels", "4", "--pipeline.model.field.log2-hashmap-size", "12",
        "--pipeline.model.field.max-resolution", "32", "--pipeline.model.field.hidden-dim", "16",
    ]


def torchrun(arguments: list, script=None, env=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 gridinr-train ARGUMENTS` (or another script), one thread per rank."""
    console_script = Path(sys.executable).parent / "gridinr-train"
    target = [str(script)] if script else ([str(console_script)] if console_script.exists()
                                           else ["-m", "gridinr_nerfstudio.scripts.train"])
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *target, *arguments], capture_output=True, text=True, timeout=600, env=environment)


def run_folder(output: Path) -> Path:
    (config,) = output.rglob("config.yml")
    return config.parent


def final_checkpoint(*roots: Path) -> Path:
    """The one final checkpoint a resumed run wrote under any of `roots`."""
    (found,) = [path for root in roots for path in root.rglob(f"step-{RUN_STEPS - 1:09d}.ckpt")]
    return found


def checkpoint_names(run: Path) -> list:
    return sorted(path.name for path in (run / "nerfstudio_models").iterdir())


@pytest.fixture(scope="module")
def two_rank_run(volume_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("two-ranks") / "outputs"
    result = torchrun(fit_arguments(volume_file, output))
    assert result.returncode == 0, result.stderr[-4000:]
    return run_folder(output)


def test_a_torchrun_run_writes_each_file_once(two_rank_run):
    assert checkpoint_names(two_rank_run) == ["step-000000004.ckpt", "step-000000008.ckpt", "step-000000011.ckpt"]
    assert not list(two_rank_run.glob(".*partial"))
    state = torch.load(two_rank_run / "nerfstudio_models" / "step-000000011.ckpt", weights_only=True)
    assert state["pipeline"] and all(key.startswith("_model.") and not key.startswith("_model.module.")
                                     for key in state["pipeline"])
    assert len(state["random_state"]["ranks"]) == 2  # both ranks' torch generators
    with (two_rank_run / "metrics.csv").open() as file:
        steps = [int(row["step"]) for row in csv.DictReader(file)]
    # One row per evaluation: every 4 steps and the final evaluation at the last step (split across the ranks).
    assert steps == [4, 8, RUN_STEPS - 1]
    with (two_rank_run / "train_log.csv").open() as file:
        losses = [row["step"] for row in csv.DictReader(file) if row["name"] == "Train Loss"]
    assert losses.count("0") == 1


def test_a_torchrun_run_loads_in_stage_2_export_and_ns_eval(two_rank_run, tmp_path):
    from nerfstudio.scripts.eval import ComputePSNR
    from tiny_runs import train_tiny_edit

    from gridinr_nerfstudio.scripts.export import main as export_main

    edit = train_tiny_edit(tmp_path / "edit", two_rank_run / "config.yml", iterations=2)
    assert (edit.parent / "stage1_field.ckpt").is_file() and checkpoint_names(edit.parent)
    exported = tmp_path / "field.npy"
    assert export_main(["volume", "--load-config", str(two_rank_run / "config.yml"), "--output", str(exported)]) == 0
    assert np.load(exported).shape == (24, 24, 24)
    with (two_rank_run / "metrics.csv").open() as file:  # before ns-eval appends its own row
        (final,) = [row for row in csv.DictReader(file) if int(row["step"]) == RUN_STEPS - 1]
    ComputePSNR(load_config=two_rank_run / "config.yml", output_path=tmp_path / "eval.json").main()
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert np.isfinite(results["volume_psnr"]) and results["volume_psnr"] > 5
    # The run's final evaluation, its views and slabs split over two ranks, equals one process on the same checkpoint.
    for name in ("volume_psnr", "psnr", "ssim"):
        assert float(final[name]) == pytest.approx(results[name], rel=1e-5, abs=1e-6), name


def test_a_killed_torchrun_run_resumes_to_the_end_of_the_uninterrupted_one(two_rank_run, volume_file, tmp_path):
    """Killed after the checkpoint of step 4 and resumed with --load-dir on two ranks: the same final parameters
    and schedule. Resumed on one rank with the global batch (2 x 256): the same batches, so the same run within
    float rounding."""
    output = tmp_path / "killed"
    killed = torchrun(fit_arguments(volume_file, output), script=TESTS / "torchrun_killed.py",
                      env={"KILL_AT_STEP": str(KILL_AT)})
    assert killed.returncode != 0
    killed_run = run_folder(output)
    assert checkpoint_names(killed_run) == ["step-000000004.ckpt"]
    for copy in ("two", "one"):  # each resume reads its own copy of the killed run
        shutil.copytree(killed_run, tmp_path / f"killed-for-{copy}")

    result = torchrun([*fit_arguments(volume_file, tmp_path / "resumed"), "--load-dir",
                       str(tmp_path / "killed-for-two" / "nerfstudio_models")])
    assert result.returncode == 0, result.stderr[-4000:]
    final = "step-000000011.ckpt"
    whole = torch.load(two_rank_run / "nerfstudio_models" / final, weights_only=True)
    resumed = torch.load(final_checkpoint(tmp_path / "resumed", tmp_path / "killed-for-two"), weights_only=True)
    assert resumed["pipeline"].keys() == whole["pipeline"].keys()
    for key, value in whole["pipeline"].items():
        assert torch.allclose(value.float(), resumed["pipeline"][key].float(), atol=1e-6), key
    for group, scheduler in whole["schedulers"].items():
        assert resumed["schedulers"][group]["_last_lr"] == pytest.approx(scheduler["_last_lr"], rel=1e-9)

    import tyro
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    config = tyro.cli(AnnotatedBaseConfigUnion, args=[*fit_arguments(volume_file, tmp_path / "one-rank", batch=512),
                                                      "--load-dir", str(tmp_path / "killed-for-one" / "nerfstudio_models")])
    run_ns_train(config)  # ns-train's own path, one process
    alone = torch.load(final_checkpoint(tmp_path / "one-rank", tmp_path / "killed-for-one"), weights_only=True)
    assert alone["pipeline"].keys() == whole["pipeline"].keys()
    for key, value in whole["pipeline"].items():
        assert torch.allclose(value.float(), alone["pipeline"][key].float(), atol=1e-4), key


def test_ns_train_several_processes_on_a_cpu_says_to_use_torchrun(tmp_path):
    """nerfstudio's own launcher asserts CUDA: on a CPU, one line pointing at torchrun, and no run folder."""
    from nerfstudio.scripts.train import main as ns_train_main

    from gridinr_nerfstudio.gridinr_config import fit_trainer_config

    config = fit_trainer_config()
    config.output_dir, config.vis = tmp_path / "outputs", "tensorboard"
    config.machine.device_type, config.machine.num_devices = "cpu", 2
    with pytest.raises(SystemExit) as error:
        ns_train_main(config)
    message = str(error.value.code)
    assert "\n" not in message and "torchrun" in message and "gridinr-train gridinr-fit" in message
    assert not (tmp_path / "outputs").exists()
