"""Data for development and tests: seeded synthetic EM volumes with mitochondria labels."""

from volseg.data.synthetic import DOMAINS, DomainStyle, SyntheticVolume, generate_volume

__all__ = ["DOMAINS", "DomainStyle", "SyntheticVolume", "generate_volume"]
