"""Trainable parameters of every adapter at real backbone sizes, for docs/adapters.md. No weights are
needed: each adapter is built for the feature space a cache of that backbone would have (width, depth,
heads and patch grid read from open_clip's model configs), 8 frames, every layer with all tokens, pixels
at 112 px x 2 frames, class-name text embeddings.

    python docs/adapter_params.py            # prints the markdown table
"""
from cachefeat import adapters
from cachefeat.adapters import FeatureSpec
from cachefeat.extract.backbone import model_geometry
from cachefeat.specs import TokenSpec

SETTINGS = [("probe", {}), ("temporal", {}), ("evl", {}), ("dist", {"pool_blocks": 2, "head": "linear"}),
            ("dist", {"pool_blocks": 4, "head": "text"}), ("dist", {"pool_blocks": 2, "head": "text"}),
            ("madapter", {}), ("madapter", {"tokens": "patch"})]


def spec_for(model: str, classes: int) -> FeatureSpec:
    g = model_geometry(model)
    return FeatureSpec(num_classes=classes, frames=8, width=g["width"], embed_dim=g["embed_dim"], depth=g["depth"],
                       heads=g["width"] // 64, layers=tuple(range(g["depth"])),
                       tokens=TokenSpec("all", tuple(g["patch_grid"])), patch_grid=tuple(g["patch_grid"]),
                       pixels={"size": 112, "factor": 2}, has_text=True)


if __name__ == "__main__":
    print("| adapter | options | ViT-B/16, 400 classes | ViT-L/14, 400 classes | ViT-B/16, 174 classes "
          "| ViT-L/14, 174 classes |")
    print("|---|---|---|---|---|---|")
    for name, opts in SETTINGS:
        cells = []
        for classes in (400, 174):
            for model in ("ViT-B-16", "ViT-L-14"):
                cells.append(f"{adapters.build(name, opts, spec_for(model, classes)).num_trainable() / 1e6:.2f}M")
        cells = [cells[0], cells[1], cells[2], cells[3]]
        o = " ".join(f"{k}={v}" for k, v in opts.items()) or "defaults"
        print(f"| {name} | {o} | " + " | ".join(cells) + " |")
