"""perfline.simulator."""
