"""perfline.toolbox."""
