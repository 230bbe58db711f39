"""mmadapters.vision — image and vision-language backbones and recipes.

Will hold: CLIP (open_clip) and ViT (timm) backbones with their adapter points, the zero-shot
classifier, Tip-Adapter / Tip-Adapter-F and CapS-Adapter, the VL-T5 backbone and the VL-Adapter recipe
(shared adapters, Hyperformer, Compacter), and a shipped tiny CLIP pretrained on generated images.
"""
