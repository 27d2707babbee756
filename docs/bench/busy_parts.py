"""Beside one `yes` burner: is the time lost in the fused kernel or in the torch ops around it? (brain MRI, 256x256)"""
import json, statistics, time
import nerfstudio.configs.method_configs  # noqa: F401
import torch
from gridinr_nerfstudio.runs import load_run_pipeline
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.rendering import fused_march
from gridinr_nerfstudio.rendering.fused_march import GridSamples
from gridinr_nerfstudio.rendering.images import camera_rays, render_image
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.scripts.bench.timing import cpu_burners

_, pipeline, _, _ = load_run_pipeline("/tmp/i24/runs/mni/gridinr-fit/run/config.yml", test_mode="test", device="cpu")
model = pipeline.model
raw = DenseGridField.from_volume(model.volume)
color = model.color_fn()
cells = OccupancyGrid.from_volume(raw.volume, raw.half_size, 128).update(color)
o, d = camera_rays(pipeline.datamanager.eval_dataset.cameras, 0)
kw = dict(num_samples=128, occupancy_grid=cells, background=model.render_kwargs()["background"])
captured = {}
original = fused_march._march_forward
def capture(table, m):
    captured["args"] = (table, m)
    return original(table, m)
fused_march._march_forward = capture
render_image(o, d, GridSamples(raw, color), model.aabb, **kw)
fused_march._march_forward = original
table, march = captured["args"]

def full(): render_image(o, d, GridSamples(raw, color), model.aabb, **kw)
def kernel(): original(table, march)
res = {}
for threads in (2, 1):
    torch.set_num_threads(threads)
    for name, fn in (("full_frame", full), ("kernel_alone", kernel)):
        for load in (0, 1):
            times = []
            with cpu_burners(load):
                for _ in range(5):
                    t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
            res[f"{name}_{threads}threads_{'busy' if load else 'idle'}_ms"] = 1000 * statistics.median(times)
print(json.dumps(res, indent=1))
