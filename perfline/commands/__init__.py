"""perfline.commands."""
