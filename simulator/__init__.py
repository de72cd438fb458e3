"""perfline.simulator: numerical perfusion phantom, MRD k-space/image writer, ground truth."""

from perfline.simulator.image_study import ImageSlice, simulate_image_study

__all__ = ["ImageSlice", "simulate_image_study"]
