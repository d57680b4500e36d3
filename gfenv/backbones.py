"""torchvision backbones (placeholder)."""
