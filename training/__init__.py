"""mtserve training side: data, trainer, checkpoints, ONNX export, experiments (torch + timm)."""
