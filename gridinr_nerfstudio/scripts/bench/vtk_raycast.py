"""VTK's CPU ray caster as a contender of ``gridinr-bench render --against vtk``: what our users already have open.

``vtkFixedPointVolumeRayCastMapper`` renders on the CPU (15-bit fixed point, its own space leaping, threads over
scan lines), but VTK still needs a render window to show its image: we use an offscreen one, which the VTK 9.4+
wheels open through EGL (Mesa's software rasteriser here, no display); ``VTK_DEFAULT_OPENGL_WINDOW`` is set to
``vtkEGLRenderWindow`` unless the caller chose one (``vtkOSOpenGLRenderWindow`` needs libOSMesa).

The scene matches ours: the same voxels (the file's dtype when the values need no rescaling, else our normalised
float32 values) on the same world box (origin at -h, spacing 2h / (n - 1)), the same cameras (position, focal point
down the camera's -z, view-up its +y, vertical field of view), the transfer function's colour nodes and opacity
points in the data's units with ParaView's opacity unit distance, linear interpolation, no shading, black
background. Where the settings differ (said in README, "Benchmarks"): VTK steps a fixed world distance
(`sample_distance`, one voxel by default) where we split each ray into `num_samples` bins; it stops a ray once its
remaining opacity is below 0xff / 0x7fff (0.0078) where we stop below 1e-4; it accumulates in 15-bit fixed point.
``vtk`` is an optional extra (``pip install gridinr-nerfstudio[vtk]``, not installed by make), never a plugin dependency.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch


def vtk_available() -> bool:
    try:
        import vtkmodules  # noqa: F401
    except ImportError:
        return False
    return True


class VtkRayCaster:
    """One VTK scene of `volume` (a data.volume_io.Volume) with `transfer_function`, rendered offscreen."""

    def __init__(self, volume, transfer_function, image_size: tuple[int, int], threads: int,
                 sample_distance: float | None = None) -> None:
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
        import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL window and volume classes)
        import vtkmodules.vtkRenderingVolumeOpenGL2  # noqa: F401
        from vtkmodules.util.numpy_support import numpy_to_vtk
        from vtkmodules.vtkCommonDataModel import vtkImageData, vtkPiecewiseFunction
        from vtkmodules.vtkRenderingCore import (
            vtkColorTransferFunction,
            vtkRenderer,
            vtkRenderWindow,
            vtkVolume,
            vtkVolumeProperty,
            vtkWindowToImageFilter,
        )
        from vtkmodules.vtkRenderingVolume import vtkFixedPointVolumeRayCastMapper

        half = np.asarray(volume.half_size, dtype=np.float64)
        dims = np.asarray(volume.info.dims)
        raw = np.asarray(volume.data)
        as_stored = (raw.dtype.kind in "ui" and volume.value_scale == 1.0 and volume.value_offset == 0.0
                     and volume.nan_policy != "replace")
        if as_stored:  # VTK's native integer path, transfer function in the file's units
            voxels, low, span = np.ascontiguousarray(raw), volume.value_min, volume.value_max - volume.value_min
        else:
            voxels, low, span = volume.normalized_array(), 0.0, 1.0
        image = vtkImageData()
        image.SetDimensions(*(int(n) for n in dims))
        image.SetOrigin(*(-half))
        image.SetSpacing(*(2.0 * half / (dims - 1)))
        self._scalars = numpy_to_vtk(voxels.reshape(-1), deep=True)
        image.GetPointData().SetScalars(self._scalars)

        colors = vtkColorTransferFunction()
        for node, rgb in zip(transfer_function.color_nodes, transfer_function.colors):
            colors.AddRGBPoint(low + float(node) * span, *map(float, rgb))
        opacity = vtkPiecewiseFunction()
        for value, alpha in transfer_function.opacity_points:
            opacity.AddPoint(low + float(value) * span, float(alpha))
        prop = vtkVolumeProperty()
        prop.SetColor(colors)
        prop.SetScalarOpacity(opacity)
        prop.SetScalarOpacityUnitDistance(transfer_function.unit_distance)
        prop.SetInterpolationTypeToLinear()
        prop.ShadeOff()

        self.mapper = vtkFixedPointVolumeRayCastMapper()
        self.mapper.SetInputData(image)
        self.mapper.SetNumberOfThreads(threads)
        self.mapper.AutoAdjustSampleDistancesOff()
        self.mapper.SetImageSampleDistance(1.0)
        self.sample_distance = sample_distance or float(2.0 / max(dims.max() - 1, 1))  # one voxel, VTK's default
        self.mapper.SetSampleDistance(self.sample_distance)
        actor = vtkVolume()
        actor.SetMapper(self.mapper)
        actor.SetProperty(prop)
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0.0, 0.0, 0.0)
        self.renderer.AddVolume(actor)
        self.window = vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.AddRenderer(self.renderer)
        self.window.SetSize(*image_size)  # (width, height)
        self.grabber = vtkWindowToImageFilter()
        self.grabber.SetInput(self.window)
        self.window_class = type(self.window).__name__

    def render(self, camera_to_world: torch.Tensor, fov_degrees: float) -> tuple[np.ndarray, float]:
        """The image (H, W, 3) in [0, 1] seen by a nerfstudio camera (OpenGL convention), and the seconds VTK took
        for the frame (Render(), the mapper's ray casting and the window's compositing of its image)."""
        c2w = camera_to_world.detach().cpu().double().numpy()
        position = c2w[:, 3]
        camera = self.renderer.GetActiveCamera()
        camera.SetPosition(*position)
        camera.SetFocalPoint(*(position - c2w[:, 2]))
        camera.SetViewUp(*c2w[:, 1])
        camera.SetViewAngle(fov_degrees)
        self.renderer.ResetCameraClippingRange()
        started = time.perf_counter()
        self.window.Render()
        seconds = time.perf_counter() - started
        self.grabber.Modified()
        self.grabber.Update()
        from vtkmodules.util.numpy_support import vtk_to_numpy

        output = self.grabber.GetOutput()
        width, height, _ = output.GetDimensions()
        pixels = vtk_to_numpy(output.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
        return pixels.astype(np.float32) / 255.0, seconds

    def mapper_seconds(self) -> float:
        """The mapper's own time of the last frame (ray casting only)."""
        return float(self.mapper.GetTimeToDraw())
