"""Regenerate the README pictures from a gridinr-fit run: reference vs fit, a ParaView preset, shading,
depth and normals of one orbit view.

    .venv/bin/python docs/make_figures.py --load-config outputs/c60/gridinr-fit/c60/config.yml --output docs/images/c60.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import imageio.v3 as iio
import matplotlib
import numpy as np
import torch
from nerfstudio.utils.eval_utils import eval_setup

from gridinr_nerfstudio.data.orbit_cameras import circle_cameras


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-config", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--preset", default="Cool Warm Volume", help="ParaView preset for the second panel")
    args = parser.parse_args()
    _, pipeline, _, _ = eval_setup(args.load_config, test_mode="test")
    model = pipeline.model
    settings = model.render_settings
    camera = circle_cameras(1, image_size=256, elevation_deg=25.0)

    def render(**changes) -> dict:
        saved = {key: getattr(settings, key) for key in changes}
        for key, value in changes.items():
            setattr(settings, key, value)
        with torch.no_grad():
            out = model.get_outputs_for_camera(camera)
        for key, value in saved.items():
            setattr(settings, key, value)
        return {key: value.cpu().numpy() for key, value in out.items()}

    reference = pipeline.datamanager.eval_dataset.get_image_float32(0)[..., :3].numpy()
    ref_camera = pipeline.datamanager.eval_dataset.cameras[0:1]
    with torch.no_grad():
        fitted = model.get_outputs_for_camera(ref_camera)["rgb"].cpu().numpy()
    preset = render(preset=args.preset)["rgb"]
    model.config.compute_normals = True
    shaded = render(shading=True)
    model.config.compute_normals = False
    accumulation = shaded["accumulation"][..., 0]
    depth = shaded["depth"][..., 0]
    visible = accumulation > 0.05
    near, far = (np.percentile(depth[visible], [2, 98]) if visible.any() else (0.0, 1.0))
    depth_rgb = matplotlib.colormaps["viridis"](np.clip((depth - near) / max(far - near, 1e-6), 0, 1))[..., :3]
    depth_rgb *= accumulation[..., None]
    normals_rgb = (shaded["normals"] + 1.0) / 2.0 * accumulation[..., None]
    panels = [reference, fitted, preset, shaded["rgb"], depth_rgb, normals_rgb]
    strip = np.concatenate([np.clip(p, 0, 1) for p in panels], axis=1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(args.output, (strip * 255 + 0.5).astype(np.uint8))
    print(f"wrote {args.output}: reference | fit | preset '{args.preset}' | shaded | depth | normals")


if __name__ == "__main__":
    main()
