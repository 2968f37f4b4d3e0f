"""The training-cost benchmark's pieces on the tiny ViT (seconds): the inserted ST-Adapters start as the
frozen backbone and are the only thing that trains, and every variant takes an optimizer step."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from cachefeat.extract.backbone import load_backbone  # noqa: E402

from bench_training import VARIANTS, Variant  # noqa: E402
from conftest import TINY  # noqa: E402
from st_adapter import insert_st_adapters  # noqa: E402


def test_inserted_st_adapters_start_as_the_frozen_backbone_and_alone_get_gradients():
    bb = load_backbone(TINY, "none", device="cpu")
    x = torch.randn(2 * 4, 3, 32, 32)
    before = bb.visual(x)
    params = insert_st_adapters(bb.visual, frames=4)
    after = bb.visual(x)
    torch.testing.assert_close(before, after)            # zero-initialised up projections
    after.sum().backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in bb.visual.named_parameters() if ".adapter." not in n)
    assert sum(p.numel() for p in params) < 0.2 * sum(p.numel() for p in bb.visual.parameters())


@pytest.mark.parametrize("kind", VARIANTS)
def test_every_training_cost_variant_takes_a_step(kind):
    v = Variant(kind, TINY, "cpu", clips=2, frames=4)
    before = [p.detach().clone() for p in v.params]
    loss = v.step()
    assert loss > 0 and any(not torch.equal(a, p) for a, p in zip(before, v.params))
    if kind == "finetune":
        assert v.trainable_params() > sum(p.numel() for p in v.adapter.parameters())
