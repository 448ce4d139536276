from hydra.model.heads.draft_heads import DraftHeads
from hydra.model.heads.prefix_layer import PrefixLayer
from hydra.model.heads.resblock import HeadMLP, ResBlock

__all__ = ["DraftHeads", "HeadMLP", "PrefixLayer", "ResBlock"]
