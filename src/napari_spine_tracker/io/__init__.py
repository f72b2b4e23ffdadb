"""Files: TIFF series, spine tables, training sets and checkpoints. Writes are atomic."""
