"""nerfstudio dataparser entry point `gridinr-volume`.

Imports only the dataparser module (nerfstudio's dataparser registry imports this while it is being built;
reaching datamanagers or pipelines from here would be a circular import).
"""

from nerfstudio.plugins.registry_dataparser import DataParserSpecification

from gridinr_nerfstudio.volume_dataparser import VolumeDataParserConfig

gridinr_volume_dataparser = DataParserSpecification(
    config=VolumeDataParserConfig(),
    description="Scientific volume (dataset.json + raw/dat, Open SciVis raw, npy, NRRD, NIfTI) seen by orbit cameras.",
)
