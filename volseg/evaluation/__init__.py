"""Scoring segmentations: metrics (Dice, IoU, AJI, PQ, AP-75), streaming over volumes larger than memory
(dask), and the report."""
