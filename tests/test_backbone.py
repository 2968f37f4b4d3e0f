import os
import subprocess
import sys

import open_clip
import pytest
import torch

from cachefeat.devices import DeviceError
from cachefeat.extract.backbone import (
    BackboneError,
    _pick_quickgelu,
    load_backbone,
    model_geometry,
    resolve_model_name,
    weights_digest,
)
from cachefeat.specs import TokenSpec

from conftest import TINY


def test_model_names():
    assert resolve_model_name("ViT-L/14") == "ViT-L-14"
    assert resolve_model_name("ViT-L/14@336px") == "ViT-L-14-336"
    assert resolve_model_name("vit-b-16") == "ViT-B-16"
    assert (resolve_model_name("hf-hub:timm/vit_base_patch16_clip_224.openai")
            == "hf-hub:timm/vit_base_patch16_clip_224.openai")
    with pytest.raises(BackboneError, match="unknown model 'ViT-L/15'; did you mean ViT-L-16"):
        resolve_model_name("ViT-L/15")


def test_quickgelu_tags_select_the_quickgelu_model():
    assert _pick_quickgelu("ViT-B-16", "openai") == ("ViT-B-16-quickgelu", False)
    assert _pick_quickgelu("ViT-L-14", "openai") == ("ViT-L-14-quickgelu", False)
    assert _pick_quickgelu("ViT-B-16", "laion2b_s34b_b88k") == ("ViT-B-16", False)


def test_random_weights_are_a_function_of_the_seed():
    a, b, c = (load_backbone(TINY, "none", "cpu", seed=s) for s in (0, 0, 1))
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    d = a.describe()
    assert (d["depth"], d["width"], d["patch_grid"], d["embed_dim"], d["init_seed"]) == (4, 64, [4, 4], 32, 0)
    assert a.preprocessing.size == (32, 32)


def test_local_checkpoint_file(tmp_path):
    torch.manual_seed(123)
    model = open_clip.create_model(TINY, pretrained=None)
    ckpt = tmp_path / "tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    b = load_backbone(TINY, str(ckpt), "cpu")
    assert b.weights_sha256 == weights_digest(model.visual)
    assert b.pretrained == str(ckpt) and b.init_seed is None
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    feats = b.features(x, [3], TokenSpec("cls"))
    with torch.inference_mode():
        ref = model.encode_image(b.normalize(x))
    assert torch.allclose(feats["embed"], ref, atol=1e-5)


def test_bad_settings_are_one_line_errors(tmp_path):
    with pytest.raises(BackboneError, match="not a ViT"):
        load_backbone("RN50", "none", "cpu")
    with pytest.raises(BackboneError, match="neither a file nor a known tag for ViT-B-32; tags: openai"):
        load_backbone("ViT-B-32", "laion5000", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            load_backbone(TINY, "none", "cuda")
    with pytest.raises(DeviceError, match="fp16 needs a GPU"):
        load_backbone(TINY, "none", "cpu", precision="fp16")
    geo = model_geometry("ViT-B/16")
    assert (geo["depth"], geo["width"], geo["patch_grid"], geo["embed_dim"]) == (12, 768, [14, 14], 512)


def test_pretrained_tag_offline_fails_with_a_clear_line(tmp_path, synth_small):
    """Real loading code for a tag runs (no weights can be downloaded here): the QuickGELU model is chosen for
    the `openai` tag and the failure is one line naming it, exit status 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "cachefeat", "extract", str(synth_small / "val.txt"), "--out",
                        str(tmp_path / "c.zarr"), "--model", "ViT-B/32", "--pretrained", "openai"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "could not build ViT-B-32-quickgelu with its pretrained weights" in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "c.zarr").exists()
