"""LoRA adapters (peft) on the text tower of a network's frozen CLIP: how fine-tuning (cliptnseg's ``lora`` text side)
and TGC-Net's training adapt the text side with few parameters, merged into the tower's weights at export."""

from __future__ import annotations

LORA_TARGETS = r"transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)"  # the text tower's blocks, not visual.*


class TextAdapters:
    """LoRA (rank ``rank``, alpha 2 x rank, no dropout) on the attention and MLP layers of ``net.clip``'s text tower
    (``net``: a ``clip_backbone.FrozenCLIPNet``); ``params``: the adapters' tensors, trainable; ``merge()`` folds them
    into the tower's weights and freezes it again (the exported model has no adapter)."""

    def __init__(self, net, rank: int = 8):
        from peft import LoraConfig, get_peft_model

        self.net = net
        self.peft = get_peft_model(net.clip, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                         target_modules=LORA_TARGETS))
        self.params = [p for n, p in net.clip.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)

    def merge(self) -> None:
        self.net.clip = self.peft.merge_and_unload()
        self.net.freeze_clip()
