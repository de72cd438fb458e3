"""perfline.core."""
