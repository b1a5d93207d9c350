"""SETR models as plain ``torch.nn.Module`` (nothing of Lightning here)."""

from setr.models.encoder import ViTEncoder, load_state_dict_file
from setr.models.encoders import ENCODERS
from setr.models.heads import LinearAuxHead, MLAHead, MLANeck, UpHead
from setr.models.registry import HEADS, NECKS, Registry
from setr.models.setr import SETR, build_setr

__all__ = ["ENCODERS", "HEADS", "NECKS", "SETR", "LinearAuxHead", "MLAHead", "MLANeck", "Registry", "UpHead",
           "ViTEncoder", "build_setr", "load_state_dict_file"]
