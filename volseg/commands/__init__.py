"""What each CLI verb does, as plain functions of a :class:`volseg.config.Config` (no argparse here)."""
