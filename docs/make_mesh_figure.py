"""Render an exported isosurface (.ply/.obj from `gridinr-export mesh`) to a PNG for the README, with matplotlib.

    python docs/make_mesh_figure.py MESH.ply docs/images/c60_mesh.png [--title TEXT]

Faces are shaded by a headlight (Lambert on the face normals); no OpenGL needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import trimesh  # noqa: E402
from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mesh", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--title", default="")
    args = parser.parse_args()
    mesh = trimesh.load(args.mesh, process=False)
    elevation, azimuth = 25.0, 40.0
    view = np.array([np.cos(np.radians(elevation)) * np.cos(np.radians(azimuth)),
                     np.cos(np.radians(elevation)) * np.sin(np.radians(azimuth)), np.sin(np.radians(elevation))])
    light = np.clip(mesh.face_normals @ view, 0.0, 1.0)
    colors = plt.get_cmap("copper")(0.25 + 0.75 * light)
    figure = plt.figure(figsize=(5, 5), dpi=110)
    axes = figure.add_subplot(projection="3d")
    axes.add_collection3d(Poly3DCollection(mesh.vertices[mesh.faces], facecolors=colors, linewidths=0))
    low, high = mesh.bounds
    centre, half = (low + high) / 2, (high - low).max() / 2
    for setter, c in zip((axes.set_xlim, axes.set_ylim, axes.set_zlim), centre):
        setter(c - half, c + half)
    axes.set_box_aspect((1, 1, 1))
    axes.view_init(elev=elevation, azim=azimuth)
    axes.set_xlabel("x")
    axes.set_ylabel("y")
    axes.set_zlabel("z")
    axes.set_title(args.title, fontsize=9)
    figure.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.output)
    print(f"wrote {args.output} ({len(mesh.faces):,} triangles)")


if __name__ == "__main__":
    main()
