"""perfline.gadgets."""
