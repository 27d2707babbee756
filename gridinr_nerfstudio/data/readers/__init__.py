"""One module per container a volume arrives in; `data/volume_io.py` picks the reader by the path."""
