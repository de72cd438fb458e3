"""perfline.server."""
