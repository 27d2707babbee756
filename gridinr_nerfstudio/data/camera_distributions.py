"""Camera distributions for rendered training sets: orbit rings, evenly over the sphere, at random with jitter, or a
nerfstudio camera path file (what the viewer's "Generate Command" and ns-render read).

Poses follow nerfstudio (OpenGL: the camera looks down -z, y up; world z up) and the volume's scene box sits inside
[-1, 1]^3 around the origin. Each distribution gives a `CameraSet`: poses, a focal length per camera (square
pixels, principal point at the image centre) and what was drawn for each camera (eye radius, look-at point, roll,
field of view), which the dataset writer records per frame. Randomness comes from a numpy Generator only, so a
seed gives the same cameras on any machine.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from nerfstudio.cameras.cameras import Cameras, CameraType

from gridinr_nerfstudio.data.orbit_cameras import look_at

DISTRIBUTIONS = ("orbit", "sphere", "random")


class CameraSpecError(ValueError):
    """A bad camera option or camera path file, as one line."""


@dataclass
class CameraJitter:
    """Per-camera random changes (each uniform in its range; 0 = off)."""

    radius: float = 0.0
    """Relative: the eye's distance is radius * U(1 - j, 1 + j)."""
    fov_degrees: float = 0.0
    """The vertical field of view is fov + U(-j, j) degrees."""
    roll_degrees: float = 0.0
    """Rotation about the viewing axis, U(-j, j) degrees."""
    look_at: float = 0.0
    """The point looked at is U(-j, j)^3 world units around the origin."""


RANDOM_JITTER = CameraJitter(radius=0.2, fov_degrees=10.0, roll_degrees=15.0, look_at=0.1)
"""The `random` distribution's jitter where no other is given."""


@dataclass
class CameraSet:
    """Cameras of a dataset: poses (N, 3, 4), focal lengths (N,) in pixels, one image size, optional times."""

    camera_to_worlds: torch.Tensor
    focal: torch.Tensor
    width: int
    height: int
    records: list[dict[str, Any]] = field(default_factory=list)
    """What was drawn for each camera (recorded per frame in transforms.json)."""
    times: Optional[torch.Tensor] = None
    """(N,) in [0, 1] when the cameras come from a camera path with times (`render_time`)."""

    def __len__(self) -> int:
        return int(self.camera_to_worlds.shape[0])

    def cameras(self) -> Cameras:
        """nerfstudio Cameras of the set (principal point at the image centre)."""
        count = len(self)
        return Cameras(
            camera_to_worlds=self.camera_to_worlds.float(),
            fx=self.focal.float().view(count, 1), fy=self.focal.float().view(count, 1),
            cx=torch.full((count, 1), self.width / 2.0), cy=torch.full((count, 1), self.height / 2.0),
            width=torch.full((count, 1), self.width, dtype=torch.long),
            height=torch.full((count, 1), self.height, dtype=torch.long),
            camera_type=CameraType.PERSPECTIVE,
        )

    def subset(self, indices: list[int]) -> "CameraSet":
        pick = torch.as_tensor(indices, dtype=torch.long)
        return CameraSet(self.camera_to_worlds[pick], self.focal[pick], self.width, self.height,
                         [self.records[i] for i in indices] if self.records else [],
                         None if self.times is None else self.times[pick])


def focal_from_fov(fov_degrees: np.ndarray | float, height: int) -> np.ndarray:
    """Focal length in pixels of a vertical field of view over `height` pixels."""
    return 0.5 * height / np.tan(np.radians(fov_degrees) / 2.0)


def ring_directions(count: int, rings: int, elevation_range: tuple[float, float]) -> np.ndarray:
    """`count` unit vectors on `rings` horizontal rings with elevations evenly spaced over `elevation_range` (degrees),
    the cameras shared out as evenly as possible, evenly spaced in azimuth on each ring (odd rings offset by half a
    step, so neighbouring rings interleave)."""
    rings = min(rings, count)
    low, high = elevation_range
    elevations = np.radians(np.linspace(low, high, rings) if rings > 1 else np.array([(low + high) / 2.0]))
    per_ring = [count // rings + (1 if ring < count % rings else 0) for ring in range(rings)]
    directions = []
    for ring, (elevation, number) in enumerate(zip(elevations, per_ring)):
        azimuth = 2.0 * np.pi * (np.arange(number) + 0.5 * (ring % 2)) / number
        directions.append(np.stack([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                                    np.full(number, np.sin(elevation))], axis=-1))
    return np.concatenate(directions)


def sphere_directions(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` unit vectors spread evenly over the whole sphere: a Fibonacci spiral (equal-area bands in z hold equal
    shares), turned about z by a random angle."""
    index = np.arange(count) + 0.5
    z = 1.0 - 2.0 * index / count
    azimuth = math.pi * (3.0 - math.sqrt(5.0)) * index + rng.uniform(0.0, 2.0 * np.pi)
    ring = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    return np.stack([ring * np.cos(azimuth), ring * np.sin(azimuth), z], axis=-1)


def random_directions(count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` independent unit vectors, uniform on the sphere (normalised Gaussian vectors)."""
    vectors = rng.standard_normal((count, 3))
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def rolled(camera_to_world: np.ndarray, roll_degrees: np.ndarray) -> np.ndarray:
    """Poses (N, 3, 4) turned by `roll_degrees` (N,) about their viewing axis (positive: right vector towards up)."""
    angle = np.radians(roll_degrees)[:, None]
    right, up = camera_to_world[:, :, 0], camera_to_world[:, :, 1]
    out = camera_to_world.copy()
    out[:, :, 0] = np.cos(angle) * right + np.sin(angle) * up
    out[:, :, 1] = -np.sin(angle) * right + np.cos(angle) * up
    return out


def jittered_cameras(directions: np.ndarray, radius: float, fov_degrees: float, jitter: CameraJitter,
                     rng: np.random.Generator, width: int, height: int) -> CameraSet:
    """Cameras at `radius` (jittered) along `directions` from the origin, looking at the (jittered) look-at point."""
    count = directions.shape[0]
    radii = radius * rng.uniform(1.0 - jitter.radius, 1.0 + jitter.radius, count)
    fovs = fov_degrees + rng.uniform(-jitter.fov_degrees, jitter.fov_degrees, count)
    rolls = rng.uniform(-jitter.roll_degrees, jitter.roll_degrees, count)
    targets = rng.uniform(-jitter.look_at, jitter.look_at, (count, 3))
    eyes = directions * radii[:, None]
    poses = look_at(torch.from_numpy(eyes).float(), torch.from_numpy(targets).float()).double().numpy()
    poses = rolled(poses, rolls)
    records = [{"radius": float(r), "look_at": [float(v) for v in t], "roll_degrees": float(a), "fov_degrees": float(f)}
               for r, t, a, f in zip(radii, targets, rolls, fovs)]
    return CameraSet(torch.from_numpy(poses).float(), torch.from_numpy(focal_from_fov(fovs, height)).float(),
                     width, height, records)


def check_jitter(radius: float, fov_degrees: float, jitter: CameraJitter) -> None:
    """Jitter that keeps each field of view in (0, 180) and each eye away from the point it looks at."""
    if min(jitter.radius, jitter.fov_degrees, jitter.roll_degrees, jitter.look_at) < 0:
        raise CameraSpecError("camera jitters must be >= 0")
    if not radius > 0:
        raise CameraSpecError(f"--radius {radius:g} must be > 0")
    if jitter.radius >= 1.0:
        raise CameraSpecError(f"--radius-jitter {jitter.radius:g} must be < 1 (a fraction of --radius)")
    if not (0.0 < fov_degrees - jitter.fov_degrees and fov_degrees + jitter.fov_degrees < 180.0):
        raise CameraSpecError(f"--fov {fov_degrees:g} +- --fov-jitter {jitter.fov_degrees:g} must stay in (0, 180)")
    nearest = radius * (1.0 - jitter.radius)
    if nearest <= math.sqrt(3.0) * jitter.look_at:
        raise CameraSpecError(f"--look-at-jitter {jitter.look_at:g} can move the look-at point onto a camera "
                              f"(nearest eye {nearest:.3g} from the centre): make it smaller")


def make_camera_set(kind: str, count: int, width: int, height: int, radius: float = 2.5, fov_degrees: float = 45.0,
                    jitter: Optional[CameraJitter] = None, seed: int = 0, rings: int = 3,
                    elevation_range: tuple[float, float] = (-30.0, 60.0)) -> CameraSet:
    """`count` cameras of a distribution: `orbit` (rings), `sphere` (evenly spread) or `random` (uniform directions;
    jitter `RANDOM_JITTER` unless given). Raises CameraSpecError on bad options."""
    if kind not in DISTRIBUTIONS:
        raise CameraSpecError(f"--cameras: unknown distribution {kind!r} (use {', '.join(DISTRIBUTIONS)} or a .json path)")
    if count < 1 or width < 2 or height < 2 or rings < 1:
        raise CameraSpecError("--num-images must be >= 1, image sides >= 2, --rings >= 1")
    if not all(-90.0 <= e <= 90.0 for e in elevation_range):
        raise CameraSpecError(f"--elevations {elevation_range[0]:g}:{elevation_range[1]:g} must lie within -90:90")
    jitter = jitter if jitter is not None else (RANDOM_JITTER if kind == "random" else CameraJitter())
    check_jitter(radius, fov_degrees, jitter)
    rng = np.random.default_rng(seed)
    if kind == "orbit":
        directions = ring_directions(count, rings, elevation_range)
    elif kind == "sphere":
        directions = sphere_directions(count, rng)
    else:
        directions = random_directions(count, rng)
    return jittered_cameras(directions, radius, fov_degrees, jitter, rng, width, height)


def camera_path_set(path: Path, count: Optional[int] = None) -> CameraSet:
    """The cameras of a nerfstudio camera path file (read by nerfstudio's own `get_path_from_json`), all of them or
    `count` evenly spaced ones. Perspective paths only (the dataset's camera model)."""
    from nerfstudio.cameras.camera_paths import get_path_from_json

    try:
        content = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CameraSpecError(f"{path}: not a readable camera path file ({error})") from None
    if not isinstance(content, dict) or not isinstance(content.get("camera_path"), list) or not content["camera_path"]:
        raise CameraSpecError(f'{path}: a camera path file holds a non-empty "camera_path" list (nerfstudio viewer export)')
    if str(content.get("camera_type", "perspective")).lower() != "perspective":
        raise CameraSpecError(f"{path}: camera_type {content['camera_type']!r}: only perspective paths make datasets")
    for index, camera in enumerate(content["camera_path"]):
        matrix = camera.get("camera_to_world") if isinstance(camera, dict) else None
        if not isinstance(matrix, list) or len(matrix) != 16 or not isinstance(camera.get("fov"), (int, float)):
            raise CameraSpecError(f'{path}: camera {index} needs "camera_to_world" (16 numbers) and "fov" (degrees)')
    try:
        cameras = get_path_from_json(content)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CameraSpecError(f"{path}: not a nerfstudio camera path ({type(error).__name__}: {error})") from None
    total = len(cameras)
    focal = cameras.fy.view(-1).float()
    height, width = int(cameras.height.view(-1)[0]), int(cameras.width.view(-1)[0])
    fovs = np.degrees(2.0 * np.arctan(0.5 * height / focal.numpy()))
    records = [{"fov_degrees": float(f)} for f in fovs]
    times = cameras.times.view(-1).float() if cameras.times is not None else None
    camera_set = CameraSet(cameras.camera_to_worlds.float(), focal, width, height, records, times)
    if count is None or count == total:
        return camera_set
    if not 1 <= count <= total:
        raise CameraSpecError(f"{path}: --num-images {count} but the path has {total} cameras")
    return camera_set.subset(np.round(np.linspace(0, total - 1, count)).astype(int).tolist())
