"""Tiny random-weight members of every backbone family, registered through the libraries' own mechanisms, so
tests and the CPU demo run each family in seconds.

Each is the real architecture's own constructor arguments (timm's registered function for that model)
with the sizes shrunk to 32 px images, 8 px patches (a 4x4 grid), width 64, 4 blocks, 2 heads:

  timm (`--model timm:NAME`)          mirrors
    cachefeat_tiny_vit                vit_base_patch16_224.augreg_in21k (class token; crop_pct 0.9, mean/std 0.5)
    cachefeat_tiny_dinov2_reg4        vit_small_patch14_reg4_dinov2.lvd142m (class token + 4 registers,
                                      LayerScale, no position embedding on the prefix tokens)
  open_clip (model_configs/*.json, each naming its timm trunk; tiny CLIP text towers)
    cachefeat-tiny-SigL2              ViT-B-16-SigLIP2: vit_base_patch16_siglip_224 (no class token, MAP head;
                                      a name with "siglip" would make open_clip load SigLIP's HF tokenizer)
    cachefeat-tiny-EVA02              EVA02-B-16: eva02_base_patch16_clip_224 (class token, rotary q/k,
                                      separate q/k/v projections, SwiGLU)
    cachefeat-tiny-PE-Core            PE-Core-B-16: vit_pe_core_base_patch16_224 (class token, rotary q/k,
                                      attention-pool head)
and cachefeat-tiny-ViT (an open_clip ViT) in model_configs/.

`register()` (called by backbone.register_model_configs) imports this module once: the `@register_model`
functions below then exist in timm's registry, with the pretrained configs of `default_cfgs` (timm reads
the data config, i.e. size, crop, mean/std and interpolation, from them). No weights exist for the tag
`untrained`: they are random (`--pretrained none`).
"""
from __future__ import annotations

from functools import partial

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.layers import LayerNorm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_filter
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter

_SIZE = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)


def _cfg(**kw) -> dict:
    return {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head", **kw}


# read by timm's register_model: the pretrained (data) config of each name.tag
default_cfgs = generate_default_cfgs({
    "cachefeat_tiny_vit.untrained": _cfg(crop_pct=0.9, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "cachefeat_tiny_dinov2_reg4.untrained": _cfg(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
    "cachefeat_tiny_siglip2.untrained": _cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    "cachefeat_tiny_eva02.untrained": _cfg(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
    "cachefeat_tiny_pe_core.untrained": _cfg(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
})


def _vit(variant: str, pretrained: bool, args: dict, kwargs: dict) -> VisionTransformer:
    return build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=vit_filter,
                                **{**_SIZE, **args, **kwargs})


def _eva(variant: str, pretrained: bool, args: dict, kwargs: dict) -> Eva:
    return build_model_with_cfg(Eva, variant, pretrained, pretrained_filter_fn=eva_filter,
                                **{**_SIZE, **args, **kwargs})


@register_model
def cachefeat_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("cachefeat_tiny_vit", pretrained, {}, kwargs)


@register_model
def cachefeat_tiny_dinov2_reg4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("cachefeat_tiny_dinov2_reg4", pretrained, dict(init_values=1e-5, reg_tokens=4, no_embed_class=True),
                kwargs)


@register_model
def cachefeat_tiny_siglip2(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("cachefeat_tiny_siglip2", pretrained, dict(class_token=False, global_pool="map"), kwargs)


@register_model
def cachefeat_tiny_eva02(pretrained: bool = False, **kwargs) -> Eva:
    args = dict(qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="token")
    return _eva("cachefeat_tiny_eva02", pretrained, args, kwargs)


@register_model
def cachefeat_tiny_pe_core(pretrained: bool = False, **kwargs) -> Eva:
    args = dict(mlp_ratio=4.0, global_pool="map", attn_type="rope",
                use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), rope_grid_offset=1.,
                rope_grid_indexing="xy", attn_pool_num_heads=2, attn_pool_mlp_ratio=4.,
                norm_layer=partial(LayerNorm, eps=1e-5))
    return _eva("cachefeat_tiny_pe_core", pretrained, args, kwargs)


def register() -> None:
    """Nothing to do: importing this module registered the models (timm refuses nothing twice)."""
