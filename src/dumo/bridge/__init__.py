"""A bridge from public diffusers flow-matching text-to-image transformers to DuMo.

- :mod:`dumo.bridge.families`: how SANA, SD3 and FLUX transformers are called in dumo's convention.
- :mod:`dumo.bridge.dual_head`: the v-head (the transformer's own output layers) and a u-head
  (a copy of them) from one backbone pass.
- :mod:`dumo.bridge.folder`: reading a local diffusers pipeline folder.
- :mod:`dumo.bridge.lora`: LoRA on the backbone through peft, the u-head fully trainable.

Writing a trained model back as a plain diffusers pipeline is :mod:`dumo.runs.diffusers_export`.
diffusers (and peft for LoRA) are imported only when used: ``pip install "dumo[bridge]"``.
"""

from dumo.bridge.dual_head import DualHeadTransformer
from dumo.bridge.families import FAMILIES, Family, FluxFamily, SanaFamily, SD3Family, family_of

__all__ = ["FAMILIES", "DualHeadTransformer", "Family", "FluxFamily", "SD3Family", "SanaFamily", "family_of"]
