import numpy as np
import pytest

from cachefeat.extract.sampling import clip_indices
from cachefeat.specs import (
    SamplingSpec,
    SpecError,
    TokenSpec,
    ViewSpec,
    parse_dtype,
    parse_layers,
    parse_sampling,
    parse_tokens,
    parse_views,
)


def test_layers_forms():
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("last:2", 12) == [10, 11]
    assert parse_layers("3,1,-1", 12) == [1, 3, 11]
    with pytest.raises(SpecError, match=r"blocks 0\.\.11"):
        parse_layers("12", 12)
    with pytest.raises(SpecError, match="between 1 and 4"):
        parse_layers("last:5", 4)
    with pytest.raises(SpecError, match="expected all"):
        parse_layers("first", 4)


def test_tokens_forms():
    assert parse_tokens("cls", (14, 14)) == TokenSpec("cls")
    assert parse_tokens("all", (14, 14)).num_patch_tokens == 196
    t = parse_tokens("pooled:4x2", (14, 14))
    assert (t.kind, t.grid, t.num_patch_tokens, str(t)) == ("pooled", (4, 2), 8, "pooled:4x2")
    assert TokenSpec.from_dict(t.to_dict()) == t
    with pytest.raises(SpecError, match="patch grid 4x4"):
        parse_tokens("pooled:5x5", (4, 4))
    with pytest.raises(SpecError):
        parse_tokens("some", (4, 4))


def test_views_sampling_dtype():
    assert parse_views("4x3") == ViewSpec(4, 3) and ViewSpec(4, 3).count == 12
    for bad in ("4", "2x2", "0x1"):
        with pytest.raises(SpecError):
            parse_views(bad)
    assert parse_sampling("dense:8") == SamplingSpec("dense", 8)
    assert parse_sampling("uniform") == SamplingSpec()
    with pytest.raises(SpecError):
        parse_sampling("dense")
    assert parse_dtype("fp16") == "float16"
    with pytest.raises(SpecError):
        parse_dtype("int4")


def test_uniform_segments_centre_and_views():
    u = SamplingSpec()
    assert clip_indices(32, 8, u).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    v0, v1 = clip_indices(32, 8, u, 0, 2), clip_indices(32, 8, u, 1, 2)
    assert v0.tolist() == [1, 5, 9, 13, 17, 21, 25, 29] and v1.tolist() == [3, 7, 11, 15, 19, 23, 27, 31]


def test_short_video_policy():
    # uniform: frames repeat in order
    assert clip_indices(3, 8, SamplingSpec()).tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # dense: start at 0, clamp to the last frame
    assert clip_indices(5, 4, SamplingSpec("dense", 2)).tolist() == [0, 2, 4, 4]
    assert clip_indices(1, 4, SamplingSpec("dense", 3)).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        clip_indices(0, 4, SamplingSpec())


def test_dense_views_spread_and_random_variant():
    d = SamplingSpec("dense", 4)
    assert clip_indices(100, 4, d).tolist() == [43, 47, 51, 55]  # centred: room 87, start 43
    starts = [clip_indices(100, 4, d, k, 3)[0] for k in range(3)]
    assert starts == [0, 44, 87]
    rng = np.random.default_rng(0)
    r = clip_indices(100, 4, d, rng=rng)
    assert np.all(np.diff(r) == 4) and 0 <= r[0] <= 87
    t = clip_indices(80, 8, SamplingSpec(), rng=np.random.default_rng(1))
    assert all(10 * i <= x < 10 * (i + 1) for i, x in enumerate(t))
