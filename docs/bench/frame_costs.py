"""Where a fused frame's time goes: c60 vs the brain MRI (raw_accelerated and field_cache, 256x256, 2 threads)."""
import sys, time, json
import torch
from gridinr_nerfstudio.runs import load_run_pipeline
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.fields.volume_field import decode_field_cache
from gridinr_nerfstudio.rendering.fused_march import GridSamples
from gridinr_nerfstudio.rendering.images import camera_rays, render_image
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.rendering.raymarch import RenderStats

torch.set_num_threads(2)
out = {}
for name, config in (("c60", "/tmp/i24/runs/c60/gridinr-fit/run/config.yml"), ("mni", "/tmp/i24/runs/mni/gridinr-fit/run/config.yml")):
    _, pipeline, _, _ = load_run_pipeline(config, test_mode="test", device="cpu")
    model = pipeline.model
    cams = pipeline.datamanager.eval_dataset.cameras
    raw = DenseGridField.from_volume(model.volume)
    color = model.color_fn()
    cells = OccupancyGrid.from_volume(raw.volume, raw.half_size, 128).update(color)
    bg = model.render_kwargs()["background"]
    row = {"dims": list(model.volume.info.dims), "occupied_cells": cells.occupied_fraction()}
    for label, kwargs in (("raw_accelerated", {"occupancy_grid": cells}), ("raw_volume", {}),
                          ("one_sample", {"num_samples": 1}), ("no_rays_hit", {"far": True})):
        far = kwargs.pop("far", False)
        total, stats, acc = 0.0, RenderStats(), []
        for view in range(3):
            o, d = camera_rays(cams, view)
            if far:
                o = o + 100.0  # every ray misses the box: per-frame costs outside the march
            render_image(o, d, GridSamples(raw, color), model.aabb, background=bg, **{"num_samples": 128, **kwargs})
            t = time.perf_counter()
            r = render_image(o, d, GridSamples(raw, color), model.aabb, background=bg, stats=stats,
                             **{"num_samples": 128, **kwargs})
            total += time.perf_counter() - t
            acc.append(float(r["accumulation"].mean()))
        row[label] = {"ms": 1000 * total / 3, "rays_hit_per_frame": stats.rays_hit / 3,
                      "samples_evaluated_per_frame": stats.samples_evaluated / 3,
                      "share_of_samples_evaluated": stats.samples_evaluated / max(stats.samples_total, 1),
                      "ns_per_evaluated_sample": 1e9 * total / max(stats.samples_evaluated, 1),
                      "mean_accumulation": sum(acc) / 3}
    out[name] = row
print(json.dumps(out, indent=1))
