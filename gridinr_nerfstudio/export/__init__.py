"""Results out to ParaView and friends: the decoded volume, isosurface meshes, transfer-function presets and
compact field files (`gridinr-export`, scripts/export.py)."""
