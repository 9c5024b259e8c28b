"""mtserve models: timm backbones cut into segments with per-task variants.

`models.plan` is pure Python (the serving side uses it too); the other modules need torch + timm.
"""
