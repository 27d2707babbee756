"""Device-aware defaults: one table, resolved where each option is used, overridable."""

from __future__ import annotations

import pytest
import torch

from gridinr_nerfstudio.device_defaults import CPU_DEFAULTS, CUDA_DEFAULTS, device_defaults, resolve
from gridinr_nerfstudio.fields.hash_grid import _backend
from gridinr_nerfstudio.fields.hash_grid.optim import HashGridAdam
from gridinr_nerfstudio.gridinr_config import HashGridAdamOptimizerConfig, fit_trainer_config


def test_table_and_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert device_defaults("cpu") == CPU_DEFAULTS == device_defaults(torch.device("cpu"))
    assert CPU_DEFAULTS.batch_size == 1 << 16 and CPU_DEFAULTS.render_chunk_rays == 1 << 15  # measured CPU values
    assert resolve(0, "batch_size", "cpu") == 1 << 16 and resolve(1000, "batch_size", "cuda") == 1000
    assert resolve(0, "batch_size", "cuda:0") == CUDA_DEFAULTS.batch_size > CPU_DEFAULTS.batch_size
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    assert device_defaults("cuda").hash_optimizer == "dense"  # no one-pass lazy kernel on CUDA without triton


def test_method_defaults_defer_to_the_device() -> None:
    config = fit_trainer_config()
    assert config.pipeline.datamanager.batch_size == 0 and config.pipeline.model.render_chunk_rays == 0
    assert config.optimizers["encoding"]["optimizer"].mode == "auto"


def test_hash_optimizer_modes_train_the_same_parameter() -> None:
    for mode, expected in (("auto", HashGridAdam), ("lazy", HashGridAdam), ("dense", torch.optim.Adam)):
        param = torch.nn.Parameter(torch.zeros(16))
        optimizer = HashGridAdamOptimizerConfig(lr=0.1, eps=1e-15, mode=mode).setup([param])
        assert type(optimizer) is expected
        param.grad = torch.ones(16)
        optimizer.step()
        torch.testing.assert_close(param.detach(), torch.full((16,), -0.1))  # Adam's first step: -lr * sign(grad)
    with pytest.raises(ValueError, match="mode"):
        HashGridAdamOptimizerConfig(mode="sgd").setup([torch.nn.Parameter(torch.zeros(2))])


def test_datamanager_resolves_its_batch_size(tmp_path) -> None:
    from gridinr_nerfstudio.stages.fit.datamanager import FitDataManagerConfig

    config = FitDataManagerConfig()
    config.dataparser.data = "builtin-default"
    config.dataparser.num_train_views, config.dataparser.num_eval_views, config.dataparser.image_size = 2, 2, 8
    config.dataparser.render.num_samples = 8
    config.dataparser.cache_dir = tmp_path
    manager = config.setup(device="cpu")
    points, batch = manager.next_train(step=0)
    assert points.shape == (1 << 16, 3) and manager.get_train_rays_per_batch() == 1 << 16
