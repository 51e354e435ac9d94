"""Instance segmentation of the semantic outputs: per-block labels, block stages, stitching (merge) and the run."""
