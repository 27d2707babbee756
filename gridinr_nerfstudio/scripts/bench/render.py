"""``gridinr-bench render``: rendering speed and fidelity of a fitted field vs the raw voxels, same cameras.

Contenders, all with the run's transfer function and samples per ray, on the first `--views` eval cameras:

- ``field``: the hash-grid INR evaluated at every sample (plain ray marcher);
- ``field_accelerated``: the INR with early ray termination and empty-space skipping (min/max macrocells of
  the raw voxels, which the field approximates, combined with the transfer function), evaluated per sample by
  the fused C++ kernel (encoding and MLP per block of points) when the extension is built;
- ``field_bricks``: the INR decoded onto the field cache's lattice brick by brick as the accelerated renderer's
  samples first reach each brick (``fields/brick_cache.py``), decode time included in the frame times (the first
  frame decodes most; ``first_frame_ms`` and ``decoded_share`` say how much);
- ``field_cache``: the INR decoded once onto a grid at the volume's resolution (decode time reported
  separately), then rendered like the raw voxels;
- ``raw_volume``: the reference renderer on the raw voxels (trilinear), as the reference images were made;
- ``raw_accelerated``: the same with empty-space skipping (exact: the macrocells are the raw voxels' bounds).

Every contender over a grid (``field_bricks``, ``field_cache``, ``raw_*``) is rendered by the fused C++ ray marcher
when it is built (``rendering/fused_march.py``); ``raw_volume_torch`` and ``field_cache_torch`` render the same on
the torch ray marcher (the path before the fused kernel), side by side.
``--against vtk`` adds VTK's CPU ray caster (``vtkFixedPointVolumeRayCastMapper``, same volume, cameras, image size,
transfer function and thread count; ``scripts/bench/vtk_raycast.py`` says where its settings differ) when the
``vtk`` package is installed, and ``raw_vtk_settings``: our raw-voxel renderer with at least VTK's sample density
(steps of at most one voxel on every ray) and its early termination threshold.

PSNR/SSIM of each rendering are against the run's reference images (the PNGs nerfstudio trains against).
``--device`` (auto: CUDA when available) loads the run there; frame times then come from CUDA events.
``--backends triton,torch`` adds ``field_accelerated_<backend>`` rows: the accelerated INR with the hash grid on
that backend (the plain rows use the run's backend, ``auto``). With ``triton`` the field is evaluated by the fused
Triton kernel (encoding + MLP per block of points), and a ``field_accelerated_triton_unfused`` row times the
Triton encoding kernel followed by the torch MLP on the same rays.
Contenders run in turn per view so that load from other processes hits all of them alike.
``--busy N`` also times every contender of each view beside N CPU burners (``yes > /dev/null``, started for that
view's busy pass and killed after it): ``busy_ms_per_frame`` and ``busy_x_idle`` per row, and rows
``raw_accelerated_static`` and ``field_cache_static`` whose fused kernel hands each thread one packet of rays (a
static split) instead of packets of 16 taken dynamically, the scheduling a busy machine tests (``field_bricks``'
busy pass finds the bricks its idle pass decoded), and rows ``raw_accelerated_parallel_ops`` and
``field_cache_parallel_ops``: the frame as before the thread policy took frames over (``torch_ops_in_parallel``:
torch's ops around the kernel on all threads, the kernel in torch's OpenMP team).
``--contenders a,b`` times only those rows (``vtk`` and the ``_static`` rows included by name).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import numpy as np
import torch

from gridinr_nerfstudio.data.volume_io import voxel_size_world
from gridinr_nerfstudio.eval.metrics import ImageMetrics
from gridinr_nerfstudio.fields.brick_cache import BrickFieldCache
from gridinr_nerfstudio.fields.dense_grid import DenseGridField
from gridinr_nerfstudio.fields.hash_grid._backend import cpp_extension_available
from gridinr_nerfstudio.fields.hash_grid.encoding import BACKENDS
from gridinr_nerfstudio.fields.volume_field import decode_field_cache, field_cache_dims
from gridinr_nerfstudio.rendering.fused_march import GridSamples, kernel_available, packet_rays, torch_ops_in_parallel
from gridinr_nerfstudio.rendering.images import camera_rays, render_image
from gridinr_nerfstudio.rendering.occupancy import OccupancyGrid
from gridinr_nerfstudio.runs import load_run_pipeline
from gridinr_nerfstudio.scripts.bench.timing import (
    Clock,
    add_device_argument,
    cpu_burners,
    device_label,
    resolve_device,
)

CONTENDERS = ("field", "field_accelerated", "field_bricks", "field_cache", "field_cache_torch", "raw_volume",
              "raw_volume_torch", "raw_accelerated")
VTK_EARLY_STOP = 0xFF / 0x7FFF
"""vtkFixedPointVolumeRayCastMapper ends a ray once its remaining opacity (15-bit fixed point) is below 0xff."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "render", help="ms/frame of field, accelerated field, field cache and raw volume", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--load-config", type=Path, required=True, help="config.yml of a gridinr-fit run")
    parser.add_argument("--views", type=int, default=3, help="eval views to render per contender")
    parser.add_argument("--occupancy-resolution", type=int, default=None,
                        help="macrocells per axis for empty-space skipping (default: the run's model setting)")
    parser.add_argument("--brick-size", type=int, default=8, help="cells per brick edge of the field_bricks contender")
    parser.add_argument("--backends", default="",
                        help="comma-separated hash-grid backends for extra field_accelerated_<backend> rows")
    parser.add_argument("--against", choices=["vtk"], default=None,
                        help="add VTK's CPU ray caster on the same volume, cameras and transfer function (needs vtk)")
    parser.add_argument("--busy", type=int, default=0,
                        help="also time each contender beside this many CPU burners (yes > /dev/null)")
    parser.add_argument("--contenders", default="", help="comma-separated rows to time (default: all)")
    add_device_argument(parser)
    return parser


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(getattr(args, "device", "auto"))
    against_vtk = getattr(args, "against", None) == "vtk"
    if against_vtk:
        from gridinr_nerfstudio.scripts.bench.vtk_raycast import vtk_available

        if not vtk_available():
            raise SystemExit("gridinr-bench render --against vtk: the vtk package is not installed "
                             "(pip install 'gridinr-nerfstudio[vtk]')")
    clock = Clock(device)
    _, pipeline, _, _ = load_run_pipeline(args.load_config, test_mode="test", device=device)
    model = pipeline.model
    dataset = pipeline.datamanager.eval_dataset
    views = min(args.views, len(dataset))

    started = time.perf_counter()
    cache = decode_field_cache(model.field, model.volume.info.dims)
    clock.sync()
    decode_seconds = time.perf_counter() - started
    raw = DenseGridField.from_volume(model.volume).to(device)
    color = model.color_fn()
    resolution = args.occupancy_resolution or model.config.occupancy_resolution
    raw_cells = OccupancyGrid.from_volume(raw.volume, raw.half_size, resolution).update(color)
    cache_cells = OccupancyGrid.from_volume(cache.volume, cache.half_size, resolution).update(color)
    plain = {"num_samples": model.render_settings.num_samples, "background": model.render_kwargs()["background"]}

    def field_values(points: torch.Tensor) -> torch.Tensor:
        return model.field(points).clamp(0, 1)

    def field_on(backend: str, fused_triton: bool = True):
        def sample(points: torch.Tensor) -> torch.Tensor:
            encoding = model.field.encoding
            saved = encoding.backend, getattr(encoding, "fused_triton", True)
            encoding.backend, encoding.fused_triton = backend, fused_triton
            try:
                return color(field_values(points))
            finally:
                encoding.backend, encoding.fused_triton = saved

        return sample

    bricks = BrickFieldCache(lambda unit: model.field.forward_unit(unit), field_cache_dims(model.volume.info.dims),
                             model.aabb[1], brick_size=getattr(args, "brick_size", 8), device=device)
    contenders = {  # (sample function, ray-marching options)
        "field": (lambda p: color(field_values(p)), {**plain, "early_stop_eps": 0.0}),
        "field_accelerated": (lambda p: color(field_values(p)), {**plain, "occupancy_grid": raw_cells}),
        "field_bricks": (GridSamples(bricks, color), {**plain, "occupancy_grid": raw_cells}),
        "field_cache": (GridSamples(cache, color), {**plain, "occupancy_grid": cache_cells}),
        "field_cache_torch": (GridSamples(cache, color), {**plain, "occupancy_grid": cache_cells, "fused": False}),
        "raw_volume": (GridSamples(raw, color), plain),  # as the reference images are rendered
        "raw_volume_torch": (GridSamples(raw, color), {**plain, "fused": False}),
        "raw_accelerated": (GridSamples(raw, color), {**plain, "occupancy_grid": raw_cells}),
    }
    if against_vtk:  # steps of at most one voxel on the longest chord through the box, VTK's termination
        chord = float(2.0 * model.aabb[1].norm())
        dense = {**plain, "num_samples": int(np.ceil(chord / voxel_size_world(model.volume))),
                 "early_stop_eps": VTK_EARLY_STOP, "occupancy_grid": raw_cells}
        contenders["raw_vtk_settings"] = (GridSamples(raw, color), dense)
    busy = max(0, getattr(args, "busy", 0))
    if busy and kernel_available() and device.type == "cpu":  # one packet per thread: a static split of the rays
        contenders["raw_accelerated_static"] = contenders["raw_accelerated"]
        contenders["field_cache_static"] = contenders["field_cache"]
        contenders["raw_accelerated_parallel_ops"] = contenders["raw_accelerated"]
        contenders["field_cache_parallel_ops"] = contenders["field_cache"]
    run_backend = model.field.encoding.backend
    for backend in [b.strip() for b in getattr(args, "backends", "").split(",") if b.strip()]:
        if backend not in BACKENDS:
            raise SystemExit(f"gridinr-bench render: unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
        model.field.encoding.backend = backend
        try:
            model.field.encoding.backend_for(device)  # one clear error now if it cannot run here
        finally:
            model.field.encoding.backend = run_backend
        contenders[f"field_accelerated_{backend}"] = (field_on(backend), {**plain, "occupancy_grid": raw_cells})
        if backend == "triton":  # the same without the fused kernel: encoding kernel, then the torch MLP
            contenders["field_accelerated_triton_unfused"] = (field_on(backend, fused_triton=False),
                                                              {**plain, "occupancy_grid": raw_cells})
    chosen = [name.strip() for name in getattr(args, "contenders", "").split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(contenders) - {"vtk"})
    if unknown:
        raise SystemExit(f"gridinr-bench render: unknown contender(s) {', '.join(unknown)} "
                         f"(known: {', '.join([*contenders, 'vtk'])})")
    if chosen:
        contenders = {name: contender for name, contender in contenders.items() if name in chosen}
        against_vtk = against_vtk and "vtk" in chosen
    height, width = (int(dataset.cameras.height[0]), int(dataset.cameras.width[0]))
    static_packet = -(-min(height * width, 1 << 16) // torch.get_num_threads())  # render_image's chunks

    def schedule(name: str):
        if name.endswith("_parallel_ops"):
            return torch_ops_in_parallel()
        return packet_rays(static_packet) if name.endswith("_static") else contextlib.nullcontext()

    loads = [("idle", 0)] + ([("busy", busy)] if busy else [])
    metrics = ImageMetrics(device=device)
    seconds = {name: 0.0 for name in contenders}
    busy_seconds = {name: 0.0 for name in contenders}
    scores = {name: [] for name in contenders}
    first_frame: dict[str, float] = {}
    with torch.no_grad():
        origins, directions = camera_rays(dataset.cameras, 0, device)
        for sample_fn, kwargs in contenders.values():  # untimed: JIT kernels (Triton) compile here
            render_image(origins[:8, :8], directions[:8, :8], sample_fn, model.aabb, **kwargs)
        clock.sync()
        bricks.clear()  # the warm-up decoded a few bricks: every decode of the timed frames is counted
        for index in range(views):
            origins, directions = camera_rays(dataset.cameras, index, device)
            reference = dataset.get_image_float32(index)[..., :3].to(device)
            for load, burners in loads:
                with cpu_burners(burners):
                    for name, (sample_fn, kwargs) in contenders.items():
                        holder = {}
                        with schedule(name):
                            frame_seconds = clock.time(lambda: holder.update(image=render_image(
                                origins, directions, sample_fn, model.aabb, **kwargs)["rgb"].clamp(0, 1)))
                        if load == "busy":
                            busy_seconds[name] += frame_seconds
                            continue
                        seconds[name] += frame_seconds
                        first_frame.setdefault(name, frame_seconds)
                        scores[name].append(metrics(holder["image"], reference))

    vtk_mapper_seconds = 0.0
    if against_vtk:
        from gridinr_nerfstudio.scripts.bench.vtk_raycast import VtkRayCaster

        cameras = dataset.cameras
        caster = VtkRayCaster(model.volume, color, (int(cameras.width[0]), int(cameras.height[0])),
                              threads=torch.get_num_threads())
        fov = float(np.degrees(2.0 * np.arctan(0.5 * float(cameras.height[0]) / float(cameras.fy[0]))))
        caster.render(cameras.camera_to_worlds[0], fov)  # untimed: VTK builds its min/max volume here
        seconds["vtk"], busy_seconds["vtk"], scores["vtk"] = 0.0, 0.0, []
        for index in range(views):
            if busy:
                with cpu_burners(busy):
                    busy_seconds["vtk"] += caster.render(cameras.camera_to_worlds[index], fov)[1]
            image, frame_seconds = caster.render(cameras.camera_to_worlds[index], fov)
            seconds["vtk"] += frame_seconds
            vtk_mapper_seconds += caster.mapper_seconds()
            first_frame.setdefault("vtk", frame_seconds)
            reference = dataset.get_image_float32(index)[..., :3].to(device)
            scores["vtk"].append(metrics(torch.from_numpy(image.copy()).to(device), reference))
        contenders["vtk"] = None

    rays = views * int(dataset.cameras.width[0]) * int(dataset.cameras.height[0])
    results = {}
    for name in contenders:
        results[name] = {
            "ms_per_frame": 1000.0 * seconds[name] / views,
            "rays_per_s": rays / seconds[name],
            "psnr_db": float(np.mean([s["psnr"] for s in scores[name]])),
            "ssim": float(np.mean([s["ssim"] for s in scores[name]])),
            "first_frame_ms": 1000.0 * first_frame[name],
        }
        if busy:
            results[name].update(busy_ms_per_frame=1000.0 * busy_seconds[name] / views,
                                 busy_x_idle=busy_seconds[name] / seconds[name])
    if "field_bricks" in results:
        results["field_bricks"].update(brick_size=bricks.brick_size, decoded_share=bricks.decoded_fraction(),
                                       decoded_points=bricks.decoded_points)
    if "field_cache" in results:
        results["field_cache"]["decode_seconds"] = decode_seconds
    if against_vtk:
        results["vtk"].update(mapper_ms_per_frame=1000.0 * vtk_mapper_seconds / views, window=caster.window_class,
                              sample_distance=caster.sample_distance, early_stop=VTK_EARLY_STOP)
        if "raw_vtk_settings" in results:
            results["raw_vtk_settings"]["num_samples"] = contenders["raw_vtk_settings"][1]["num_samples"]
    results["config"] = {"views": views, "num_samples": model.render_settings.num_samples,
                         "occupancy_resolution": resolution, "threads": torch.get_num_threads(),
                         "device": device_label(device), "hash_grid_backend": model.field.encoding.backend_for(device),
                         "field_evaluation": field_evaluation(model.field.encoding, device),
                         "fused_ray_marcher": kernel_available() and device.type == "cpu", "busy": busy}
    if busy:
        results["config"]["static_packet_rays"] = static_packet
    print_table(results)
    return results


def field_evaluation(encoding, device: torch.device) -> str:
    """How the run's field is evaluated when rendering: fused C++ or fused Triton kernel, else the backend's name."""
    if cpp_extension_available() and device.type == "cpu":
        return "fused C++"
    backend = encoding.backend_for(device)
    return "fused Triton" if backend == "triton" and encoding.fused_triton_enabled() else backend


def print_table(results: dict) -> None:
    config = results["config"]
    print(f"{config['views']} views, {config['num_samples']} samples per ray, {config['occupancy_resolution']} "
          f"macrocells per axis, field evaluated by {config['field_evaluation']}, fused ray marcher "
          f"{'on' if config.get('fused_ray_marcher') else 'off'}, device {config['device']}"
          + (f", busy rows beside {config['busy']} CPU burner(s)" if config.get("busy") else ""))
    raw = results.get("raw_volume")
    vtk_ms = results["vtk"]["ms_per_frame"] if "vtk" in results else None
    busy = bool(config.get("busy"))

    def ratio(value: float, base: float | None) -> str:
        return f"{value / base:>12.2f}" if base else f"{'-':>12}"

    print(f"{'contender':<24}{'ms/frame':>10}{'rays/s':>12}{'x raw time':>12}{'1st frame x':>12}{'PSNR dB':>10}"
          f"{'SSIM':>9}" + (f"{'x vtk time':>12}" if vtk_ms else "") + (f"{'busy ms':>10}{'busy x idle':>12}" if busy
                                                                          else ""))
    for name in [key for key in results if key != "config"]:
        row = results[name]
        print(f"{name:<24}{row['ms_per_frame']:>10.1f}{row['rays_per_s']:>12.4g}"
              f"{ratio(row['ms_per_frame'], raw and raw['ms_per_frame'])}"
              f"{ratio(row['first_frame_ms'], raw and raw['first_frame_ms'])}{row['psnr_db']:>10.2f}{row['ssim']:>9.4f}"
              + (ratio(row["ms_per_frame"], vtk_ms) if vtk_ms else "")
              + (f"{row['busy_ms_per_frame']:>10.1f}{row['busy_x_idle']:>12.2f}" if busy else ""))
    if "vtk" in results:
        vtk = results["vtk"]
        print(f"vtk: {vtk['window']}, sample distance {vtk['sample_distance']:.4g} (one voxel), ray casting alone "
              f"{vtk['mapper_ms_per_frame']:.1f} ms/frame" + (
                  f"; raw_vtk_settings: {results['raw_vtk_settings']['num_samples']} samples per ray, early "
                  f"termination at {VTK_EARLY_STOP:.4f}" if "raw_vtk_settings" in results else ""))
    if "field_cache" in results:
        print(f"field cache decoded once in {results['field_cache']['decode_seconds']:.2f} s")
    if "field_bricks" in results:
        print(f"field_bricks decoded {results['field_bricks']['decoded_share']:.0%} of its "
              f"{results['field_bricks']['brick_size']}^3-cell bricks "
              f"({results['field_bricks']['decoded_points'] / 1e6:.2f} M points)")
    if busy and "static_packet_rays" in config:
        print(f"_static rows: one packet of {config['static_packet_rays']} rays per thread (a static split); the "
              f"others take packets of 16 rays dynamically; _parallel_ops rows: torch's ops around the kernel on all "
              f"threads and the kernel in their OpenMP team (frames before the thread policy took them over)")
