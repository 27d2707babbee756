"""Render frames under the thread policy: the fused marcher's frames run torch's ops on one thread and the kernel on
the policy's count (thread_policy.torch_ops_on_one_thread), per Python thread, with the same image as before."""

from __future__ import annotations

import threading

import pytest
import torch
from test_fused_march import HALF, rays, reference_volumes

from gridinr_nerfstudio import thread_policy
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.rendering import fused_march
from gridinr_nerfstudio.rendering.fused_march import GridSamples
from gridinr_nerfstudio.rendering.images import render_image
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.thread_policy import kernel_threads, torch_ops_on_one_thread
from gridinr_nerfstudio.transfer.transfer_function import TransferFunction


@pytest.fixture
def two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    thread_policy.set_kernel_threads(0)
    torch.set_num_threads(before)


def test_torch_ops_on_one_thread_keeps_the_kernel_count_and_restores_torch(two_torch_threads):
    thread_policy.set_kernel_threads(3)
    with torch_ops_on_one_thread() as kernels:
        assert kernels == 3 and kernel_threads() == 3 and torch.get_num_threads() == 1
        with torch_ops_on_one_thread() as inner:  # nested (a frame's chunks): the same counts
            assert inner == 3 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2 and kernel_threads() == 3
    thread_policy.set_kernel_threads(0)  # kernels follow torch: inside, still torch's count from before the block
    with torch_ops_on_one_thread() as kernels:
        assert kernels == 2 and kernel_threads() == 2
    assert kernel_threads() == 2


def test_a_frame_on_another_python_thread_leaves_this_threads_counts_alone(two_torch_threads):
    """The viewer renders on its own thread while training runs: its block must not change the trainer's counts."""
    inside, leave = threading.Event(), threading.Event()

    def viewer():
        with torch_ops_on_one_thread():
            inside.set()
            leave.wait(10)

    worker = threading.Thread(target=viewer)
    worker.start()
    try:
        assert inside.wait(10)
        assert torch.get_num_threads() == 2 and kernel_threads() == 2
    finally:
        leave.set()
        worker.join()


@pytest.mark.skipif(not fused_march.kernel_available(), reason="fused ray-marching extension not built")
def test_fused_frames_run_torch_ops_on_one_thread_with_the_same_image(two_torch_threads, monkeypatch):
    volume = reference_volumes()["blobs"]
    field = DenseGridField(volume, HALF)
    tf = TransferFunction.ramp("viridis", 0.2, 0.7, 0.6, unit_distance=0.05)
    origins, directions = rays(400, 5)
    grid = OccupancyGrid.from_volume(volume, HALF, 8).update(tf)
    seen = []
    march = fused_march._march_forward

    def spy(table, m):
        seen.append((torch.get_num_threads(), kernel_threads()))
        return march(table, m)

    monkeypatch.setattr(fused_march, "_march_forward", spy)
    box = torch.stack([-HALF, HALF])

    def frame(sample_fn):
        return render_image(origins.reshape(20, 20, 3), directions.reshape(20, 20, 3), sample_fn, box,
                            chunk_rays=150, num_samples=32, occupancy_grid=grid)

    thread_policy.set_kernel_threads(3)
    image = frame(GridSamples(field, tf))
    assert seen == [(1, 3)] * 3 and torch.get_num_threads() == 2  # three chunks, counts restored after the frame
    seen.clear()
    with fused_march.torch_ops_in_parallel():  # the frame before: torch's ops on torch's count
        before = frame(GridSamples(field, tf))
    assert seen == [(2, 3)] * 3
    assert all(torch.equal(image[key], before[key]) for key in image)

    counts = []

    def torch_path(points):  # not a GridSamples: the torch ray marcher, whose ops need torch's threads
        counts.append(torch.get_num_threads())
        return GridSamples(field, tf)(points)

    frame(torch_path)
    assert counts and set(counts) == {2}
