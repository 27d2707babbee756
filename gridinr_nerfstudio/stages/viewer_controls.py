"""Transfer-function and rendering controls in nerfstudio's viser viewer.

The controls edit the model's live `RenderSettings`; nerfstudio re-renders after each change (its viewer
wraps our callbacks with the training lock and a re-render), so a change shows in the next frame, during
training and in `ns-viewer`, without a restart.
"""

from __future__ import annotations

from nerfstudio.viewer.viewer_elements import ViewerCheckbox, ViewerDropdown, ViewerElement, ViewerRGB, ViewerSlider

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
