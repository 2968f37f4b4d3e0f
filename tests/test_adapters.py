"""The adapters as modules: the registry, shapes of the batch contract, what each needs from a cache and
how a cache that cannot provide it is refused, parameter counts against the papers, and EVL's q/k
recomputation from a cached layer with the frozen block's own weights."""
import json

import numpy as np
import pytest
import torch

from cachefeat import adapters
from cachefeat.adapters import AdapterError, CacheMismatch, FeatureSpec
from cachefeat.extract.backbone import load_backbone
from cachefeat.specs import TokenSpec

from conftest import TINY, run_cli


def tiny_spec(tokens="all", pixels=True, text=True, grid=(4, 4)):
    return FeatureSpec(num_classes=6, frames=8, width=64, embed_dim=32, depth=4, heads=2, layers=(0, 1, 2, 3),
                       tokens=TokenSpec(tokens, grid if tokens != "cls" else None), patch_grid=(4, 4),
                       pixels={"size": 16, "factor": 2} if pixels else None, has_text=text)


def batch_for(spec, needs, B=3, seed=0):
    """Random tensors in the contracted shapes (what CachedSource + to_device deliver)."""
    g = torch.Generator().manual_seed(seed)
    T, D = spec.frames, spec.width
    b = {}
    if needs.embed:
        b["embed"] = torch.randn(B, T, spec.embed_dim, generator=g)
    if needs.cls_layers:
        b["cls"] = torch.randn(B, T, len(needs.cls_layers), D, generator=g)
    if needs.token_layers:
        b["tokens"] = torch.randn(B, T, len(needs.token_layers), spec.tokens.num_patch_tokens, D, generator=g)
    if needs.pixels:
        K, S = spec.pixels["factor"], spec.pixels["size"]
        b["pixels"] = torch.randn(B, T * K, S, S, 3, generator=g)
    return b


CASES = [("probe", {}), ("temporal", {"dim": 64}), ("evl", {"layers": 3}), ("evl", {"layers": 4, "tca": False}),
         ("dist", {"integration_dim": 64, "temporal_dim": 16}), ("dist", {"head": "text", "integration_dim": 64}),
         ("madapter", {"dim": 64}), ("madapter", {"dim": 64, "tokens": "patch", "levels": 2}),
         ("madapter", {"dim": 64, "fusion": "concat", "temporal": "conv", "combine": "parallel"}),
         ("madapter", {"dim": 64, "temporal": "mlp", "levels": 4, "layers": "last:2"})]


def test_registry_lists_every_adapter():
    assert adapters.list_adapters() == ["probe", "temporal", "evl", "dist", "madapter"]
    res = run_cli("adapters", "--json")
    listed = json.loads(res.output)
    assert [a["name"] for a in listed] == adapters.list_adapters()
    assert listed[2]["options"]["layers"] == 4 and listed[2]["reads"]
    with pytest.raises(AdapterError, match="unknown adapter 'evll'.*did you mean evl"):
        adapters.get("evll")


@pytest.mark.parametrize("name,opts", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in CASES])
def test_adapter_maps_the_batch_contract_to_logits(name, opts):
    spec = tiny_spec()
    cls, config, needs = adapters.resolve(name, opts, spec)
    assert needs.problems(name, _meta(spec)) == []
    torch.manual_seed(0)
    model = cls(config, spec)
    if needs.text:
        model.set_text(torch.randn(6, 32))
    out = model(batch_for(spec, needs))
    assert out.shape == (3, 6) and torch.isfinite(out).all()
    out.logsumexp(-1).sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert model.num_trainable() == sum(p.numel() for p in trainable) > 0
    assert all(p.grad is not None for p in trainable if p.numel() and "tca" not in str(p.shape))
    # frozen things (text embeddings, the backbone's q/k weights) are buffers: saved, never trained
    names = {n for n, _ in model.named_parameters()}
    assert not any("text" == n.split(".")[-1] or "qk_weight" in n for n in names)
    # the clip axis is independent: one clip alone gives the same logits as in the batch (eval mode)
    model.eval()
    b = batch_for(spec, needs)
    full = model(b)
    one = model({k: v[1:2] for k, v in b.items()})
    torch.testing.assert_close(one, full[1:2], rtol=1e-4, atol=1e-5)


def test_temporal_adapters_see_frame_order_and_the_probe_does_not():
    """Reversing time changes a temporal adapter's logits and leaves the probe's unchanged."""
    spec = tiny_spec()
    for name, opts in CASES:
        cls, config, needs = adapters.resolve(name, opts, spec)
        torch.manual_seed(1)
        model = cls(config, spec).eval()
        if needs.text:
            model.set_text(torch.randn(6, 32))
        with torch.no_grad():   # give the zero-initialised TCA tables and position embeddings some values
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        b = batch_for(spec, needs)
        rev = {k: v.flip(1) for k, v in b.items()}
        same = torch.allclose(model(b), model(rev), atol=1e-5)
        assert same == (name == "probe"), name


def test_parameter_counts_match_the_published_configurations():
    """At ViT-B/16 sizes with 400 classes the counts match the references' arithmetic: EVL 33.2M
    (4 decoder layers), DiST 26.1M (K400: 4 pooling blocks) and 19.0M (SSv2: 2 blocks)."""
    b16 = FeatureSpec(num_classes=400, frames=8, width=768, embed_dim=512, depth=12, heads=12,
                      layers=tuple(range(12)), tokens=TokenSpec("all", (14, 14)), patch_grid=(14, 14),
                      pixels={"size": 224, "factor": 2}, has_text=True)
    assert round(adapters.build("evl", {}, b16).num_trainable() / 1e6, 1) == 33.2
    assert round(adapters.build("dist", {"pool_blocks": 4, "head": "text"}, b16).num_trainable() / 1e6, 1) == 26.1
    assert round(adapters.build("dist", {"pool_blocks": 2, "head": "text"}, b16).num_trainable() / 1e6, 1) == 19.0


def _meta(spec, **over):
    m = {"layers": list(spec.layers), "tokens": spec.tokens.to_dict(), "frames": spec.frames,
         "pixels": spec.pixels, "text": {"template": "{}"} if spec.has_text else None}
    m.update(over)
    return m


def test_a_cache_that_cannot_provide_the_needs_is_refused_naming_the_difference():
    spec = tiny_spec()
    cls_only = _meta(spec, tokens={"kind": "cls", "grid": None})
    _, _, needs = adapters.resolve("evl", {"layers": 3}, spec)
    (msg,) = needs.problems("evl", cls_only)
    assert "needs patch tokens" in msg and "CLS tokens only" in msg and "--tokens all" in msg
    _, _, needs = adapters.resolve("temporal", {}, spec)
    (msg,) = needs.problems("temporal", _meta(spec, layers=[0, 1]))
    assert msg.startswith("temporal needs layers [3], but the cache holds layers [0, 1]")
    _, _, needs = adapters.resolve("dist", {"head": "text"}, spec)
    problems = needs.problems("dist", _meta(spec, pixels=None, text=None))
    assert any("pixels" in p and "--pixels" in p for p in problems) and any("text" in p for p in problems)
    # against a trained spec: same frames, token grid and pixel size
    problems = needs.problems("dist", _meta(spec, frames=16, tokens={"kind": "pooled", "grid": [2, 2]}), trained=spec)
    assert any("trained on 8 frames" in p for p in problems) and any("pooled:2x2" in p for p in problems)
    # needs that no cache of this model can meet
    with pytest.raises(CacheMismatch, match="block 0 has none cached"):
        adapters.resolve("evl", {"layers": 4}, spec)
    with pytest.raises(CacheMismatch, match="cannot be cut into the 4x4 token grid"):
        adapters.resolve("dist", {}, FeatureSpec(**{**spec.__dict__, "pixels": {"size": 18, "factor": 2}}))
    with pytest.raises(AdapterError, match="has no option 'width'.*options: layer, dim"):
        adapters.make_config("temporal", {"width": 3})
    with pytest.raises(AdapterError, match="dim='wide' is not a valid int"):
        adapters.make_config("temporal", {"dim": "wide"})
    assert adapters.make_config("evl", {"tca": "false", "mlp-dropout": "0.1"}).tca is False


def test_evl_recomputes_each_blocks_own_attention_from_the_cached_layer_before_it():
    """TCA needs block b's attention q/k. They are recomputed from block b-1's cached patch tokens with
    block b's frozen ln_1 and in_proj; the attention they give equals the block's own (nn.MultiheadAttention
    run on the block's real input), restricted to patch tokens."""
    bb = load_backbone(TINY, "none", device="cpu")
    spec = tiny_spec()
    model = adapters.build("evl", {"layers": 2}, spec)           # taps 2, 3; TCA reads block 1's output
    model.set_backbone(bb)
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8))
    captured = {}
    block = bb.visual.transformer.resblocks[2]
    hook = block.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0].detach().clone()))
    feats = bb.features(pixels, [1], TokenSpec("all", (4, 4)))
    hook.remove()
    x_in = captured["x"]                                           # (B, 1+N, D): block 2's real input
    torch.testing.assert_close(x_in[:, 1:], feats["tokens"][:, 0])  # = block 1's output, as the cache stores it
    with torch.no_grad():
        h = block.ln_1(x_in)
        _, ref = block.attn(h, h, h, need_weights=True, average_attn_weights=False)   # (B, H, L, L)
        ref = ref[:, :, 1:, 1:]
        ref = ref / ref.sum(-1, keepdim=True)                      # renormalised over patch keys
        q, k = model.tca[0]._qk(feats["tokens"][:, 0][:, None])    # (B, 1, H, N, d)
        mine = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)[:, 0]
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)
    # the frozen weights travel in the state dict, so eval and predict need no backbone for them
    sd = model.state_dict()
    assert torch.equal(sd["tca.0.qk_weight"], block.attn.in_proj_weight[:128])
