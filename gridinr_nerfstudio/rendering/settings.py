"""How a volume is shown: transfer function, samples per ray, background, shading.

One dataclass shared by the reference renderings (dataparser), the models, the viewer controls and the
CLIs, so that "the default transfer function" means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Optional, Tuple


@dataclass
class RenderSettings:
    """Transfer function and ray-marching settings (values are normalised to [0, 1])."""

    colormap: str = "inferno"
    """matplotlib colormap name (ignored when `preset` is set)."""
    preset: Optional[str] = None
    """ParaView colormap preset: a name shipped in gridinr_nerfstudio/presets or a path to a ParaView JSON."""
    opacity_low: float = 0.1
    """Opacity is 0 below this normalised value."""
    opacity_high: float = 0.6
    """Opacity reaches `opacity_scale` at this normalised value."""
    opacity_scale: float = 0.25
    """Opacity per unit distance (ParaView's scalar opacity) at and above `opacity_high`."""
    unit_distance: Optional[float] = None
    """Scalar opacity unit distance in world units; None: one voxel of the longest axis."""
    num_samples: int = 128
    """Samples per ray."""
    background: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Background colour (RGB in [0, 1])."""
    shading: bool = False
    """Gradient (Phong) shading with normals from the field's gradient."""

    def fingerprint(self) -> str:
        """Stable hash of the settings, for caching reference renderings."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def transfer_function(self, voxel_size: float):
        """Build the TransferFunction these settings describe. `voxel_size`: default unit distance."""
        from gridinr_nerfstudio.transfer.paraview import load_preset
        from gridinr_nerfstudio.transfer.transfer_function import TransferFunction

        unit_distance = self.unit_distance if self.unit_distance is not None else voxel_size
        if self.preset:
            return load_preset(self.preset, unit_distance=unit_distance)
        low, high = sorted((self.opacity_low, self.opacity_high))  # viewer sliders may cross
        return TransferFunction.ramp(self.colormap, low, high, self.opacity_scale, unit_distance=unit_distance)

