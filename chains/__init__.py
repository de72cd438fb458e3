"""perfline.chains."""
