from hydra.model.heads.draft_heads import DraftHeads
from hydra.model.heads.fusion import FeatureFusion
from hydra.model.heads.prefix_layer import PrefixLayer
from hydra.model.heads.resblock import HeadMLP, ResBlock

__all__ = ["DraftHeads", "FeatureFusion", "HeadMLP", "PrefixLayer", "ResBlock"]
