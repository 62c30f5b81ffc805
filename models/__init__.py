"""Models: the APS ViT (registered with timm), heads, the APS method module, and backbone loading."""
from models.aps import APS, contrastive_loss
from models.loading import detect_format, load_backbone
from models.vit import ARCHS, APSViT, create_vit

__all__ = ["APS", "contrastive_loss", "detect_format", "load_backbone", "ARCHS", "APSViT", "create_vit"]
