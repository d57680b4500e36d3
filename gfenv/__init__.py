"""gfenv: GFNet (Glance and Focus) as a Gymnasium environment."""
