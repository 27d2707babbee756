"""gridinr-nerfstudio: hash-grid implicit neural representations of scientific volumes.

Keep this module light: nerfstudio imports our entry points while building its registries.
"""

__version__ = "0.1.0"
