"""Transfer-function and rendering controls in nerfstudio's viser viewer, and where its camera starts.

The controls edit the model's live `RenderSettings`; nerfstudio re-renders after each change (its viewer
wraps our callbacks with the training lock and a re-render), so a change shows in the next frame, during
training and in `ns-viewer`, without a restart. `StartCamera` opens every browser at the run's first evaluation
camera.
"""

from __future__ import annotations

import math

import numpy as np
from nerfstudio.viewer.viewer_elements import (
    ViewerCheckbox,
    ViewerControl,
    ViewerDropdown,
    ViewerElement,
    ViewerRGB,
    ViewerSlider,
)

from gridinr_nerfstudio.data.orbit_cameras import WORLD_UP
from gridinr_nerfstudio.rendering.settings import RenderSettings
from gridinr_nerfstudio.transfer.paraview import available_presets

COLORMAPS = ["inferno", "viridis", "magma", "plasma", "cividis", "turbo", "coolwarm", "bone", "gray", "hot"]


def colormap_choices() -> list[str]:
    """matplotlib colormaps, then the shipped ParaView presets (as 'preset:NAME')."""
    return COLORMAPS + [f"preset:{name}" for name in available_presets()]


def render_controls(settings: RenderSettings) -> dict[str, ViewerElement]:
    """Viewer controls that edit `settings` in place, by name; the model holds them as `viewer_<name>` attributes
    (nerfstudio's viewer discovers elements among a model's attributes)."""
    current = f"preset:{settings.preset}" if settings.preset else settings.colormap
    choices = colormap_choices()
    if current not in choices:
        choices = [current] + choices

    def set_colormap(element: ViewerDropdown) -> None:
        value = element.value
        if value.startswith("preset:"):
            settings.preset = value[len("preset:") :]
        else:
            settings.preset, settings.colormap = None, value

    def setter(name: str, convert=float):
        def update(element) -> None:
            setattr(settings, name, convert(element.value))

        return update

    return {
        "colormap": ViewerDropdown("Colormap / preset", current, choices, cb_hook=set_colormap),
        "opacity_low": ViewerSlider("Opacity low", settings.opacity_low, 0.0, 1.0, 0.01, cb_hook=setter("opacity_low")),
        "opacity_high": ViewerSlider("Opacity high", settings.opacity_high, 0.0, 1.0, 0.01, cb_hook=setter("opacity_high")),
        "opacity_scale": ViewerSlider("Opacity scale", settings.opacity_scale, 0.0, 1.0, 0.01, cb_hook=setter("opacity_scale")),
        "samples": ViewerSlider("Samples per ray", settings.num_samples, 16, 512, 16, cb_hook=setter("num_samples", int)),
        "shading": ViewerCheckbox("Gradient shading", settings.shading, cb_hook=setter("shading", bool)),
        "background": ViewerRGB(
            "Background",
            tuple(int(round(255 * c)) for c in settings.background),
            cb_hook=lambda element: setattr(settings, "background", tuple(c / 255.0 for c in element.value)),
        ),
    }


class StartCamera(ViewerControl):
    """Opens every viewer client (ns-viewer, and the viewer during training) at the run's first evaluation camera,
    with our cameras' up direction (world +z).

    Why: viser starts its camera near the origin, which is the centre of our volumes, so a new user first saw a
    close-up blur of the volume's inside. nerfstudio hands every `ViewerControl` among the model's attributes the
    viewer (`_setup`); this one registers for new clients there, and viser calls it once a client has sent its
    first camera (before the first render, which then shows the volume from where the evaluation looks at it).
    """

    def _setup(self, viewer) -> None:
        from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO  # the viewer module is heavy; it is loaded here

        super()._setup(viewer)
        camera = viewer.pipeline.datamanager.eval_dataset.cameras[0]
        c2w = camera.camera_to_worlds.double().cpu().numpy()  # nerfstudio convention: looks down -z, y up
        position = c2w[:, 3]
        distance = max(float(np.linalg.norm(position)), 1e-6)  # our orbits look at the origin from this far
        self.position = tuple(position * VISER_NERFSTUDIO_SCALE_RATIO)
        self.look_at = tuple((position - c2w[:, 2] * distance) * VISER_NERFSTUDIO_SCALE_RATIO)
        self.fov = 2.0 * math.atan(float(camera.height) / (2.0 * float(camera.fy)))
        self.viser_server.scene.set_up_direction(WORLD_UP)  # orbit controls turn about our up axis
        self.viser_server.on_client_connect(self.place)

    def place(self, client) -> None:
        """Put `client`'s camera at the start pose (viser's setters: position first, it drags look_at along)."""
        with client.atomic():
            client.camera.position = self.position
            client.camera.look_at = self.look_at
            client.camera.up_direction = WORLD_UP
            client.camera.fov = self.fov
