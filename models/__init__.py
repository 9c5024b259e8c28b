"""mtserve models: timm backbones cut into segments with per-task variants.

The torch-free plan and accounting live in :mod:`contract`; these modules need torch + timm.
"""
