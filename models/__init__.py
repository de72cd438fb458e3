"""perfline.models."""
