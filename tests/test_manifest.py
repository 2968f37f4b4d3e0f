import json
from pathlib import Path

import pytest

from cachefeat.extract.manifest import ManifestError, load_manifest, read_class_list


def touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\x00")
    return p


def test_folder_of_class_subfolders(tmp_path):
    for c in ("jumping", "archery"):
        for i in range(2):
            touch(tmp_path / c / f"v{i}.mp4")
    touch(tmp_path / "archery" / "notes.txt")
    m = load_manifest(tmp_path)
    assert m.format == "folder" and m.classes == ["archery", "jumping"]
    assert [(Path(v.path).parent.name, v.label, v.video_id) for v in m.videos] == [
        ("archery", 0, "archery/v0"), ("archery", 0, "archery/v1"), ("jumping", 1, "jumping/v0"),
        ("jumping", 1, "jumping/v1")]
    assert len(m.sha256) == 64


def test_text_list_names_indices_spaces_and_unicode(tmp_path):
    touch(tmp_path / "dir with space" / "clip é 1.mp4")
    lines = ["# comment", "dir with space/clip é 1.mp4 dancing", "b.mp4 1", "", "c.mp4", "d.mp4 7"]
    (tmp_path / "list.txt").write_text("\n".join(lines), encoding="utf-8")
    m = load_manifest(tmp_path / "list.txt", classes=["cooking", "dancing"])
    assert [v.path for v in m.videos][0] == str(tmp_path / "dir with space" / "clip é 1.mp4")
    assert [v.label for v in m.videos] == [1, 1, -1, -1]
    assert m.videos[3].problem == "label '7' is not in the class list"
    assert not m.videos[0].problem and not m.videos[2].problem  # no label: unlabelled, not a problem


def test_text_list_tab_separates_class_names_with_spaces(tmp_path):
    """`path<TAB>label`: both sides may hold spaces; lines without a TAB keep the last-field rule."""
    lines = ["dir a/clip 1.mp4\tmoving right", "clip 2.mp4\t  moving left  ", "clip 3.mp4\t", "e.mp4 1"]
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    m = load_manifest(tmp_path / "l.txt")
    assert m.classes == ["1", "moving left", "moving right"]
    assert [(Path(v.path).name, v.label) for v in m.videos] == [("clip 1.mp4", 2), ("clip 2.mp4", 1),
                                                                ("clip 3.mp4", -1), ("e.mp4", 0)]
    assert not any(v.problem for v in m.videos)
    # without a TAB, "moving right" would be the path "a.mp4 moving" and the class "right"
    (tmp_path / "s.txt").write_text("a.mp4 moving right\n")
    assert load_manifest(tmp_path / "s.txt").classes == ["right"]


def test_text_list_integer_labels_without_class_list(tmp_path):
    (tmp_path / "l.txt").write_text("a.mp4 2\nb.mp4 0\nc.mp4 10\n")
    m = load_manifest(tmp_path / "l.txt")
    assert m.classes == [str(i) for i in range(11)] and [v.label for v in m.videos] == [2, 0, 10]


def test_duplicates_are_kept_and_flagged(tmp_path):
    (tmp_path / "l.txt").write_text("a.mp4 x\nb.mp4 y\n./a.mp4 x\n")
    m = load_manifest(tmp_path / "l.txt")
    assert len(m.videos) == 3 and m.videos[2].problem == "duplicate of video 0 (same file listed twice)"


def test_kinetics_csv(tmp_path):
    csv = ("label,youtube_id,time_start,time_end,split\n"
           "abseiling,--07WQ2iBlw,1,11,train\n"
           "air drumming,-0Ikk6IHCpU,3,13,train\n"
           "abseiling,zzz,0,10,val\n")
    (tmp_path / "train.csv").write_text(csv)
    root = tmp_path / "videos"
    touch(root / "abseiling" / "--07WQ2iBlw_000001_000011.mp4")       # in a class folder
    touch(root / "-0Ikk6IHCpU_000003_000013.mp4")                      # flat
    m = load_manifest(tmp_path / "train.csv", video_root=str(root), split="train")
    assert m.format == "kinetics" and m.classes == ["abseiling", "air drumming"]
    assert [v.video_id for v in m.videos] == ["--07WQ2iBlw_000001_000011", "-0Ikk6IHCpU_000003_000013"]
    assert all(Path(v.path).exists() for v in m.videos)
    everything = load_manifest(tmp_path / "train.csv", video_root=str(root))
    missing = everything.videos[2]
    assert missing.video_id == "zzz_000000_000010" and not Path(missing.path).exists()  # kept; fails as `missing`
    with pytest.raises(ManifestError, match="needs the columns"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        load_manifest(tmp_path / "bad.csv")


def test_something_something_json_and_labels_json(tmp_path):
    items = [{"id": "78687", "label": "holding potato next to vicks",
              "template": "Holding [something] next to [something]"},
             {"id": "42326", "template": "Putting [something] on a surface"}]
    (tmp_path / "train.json").write_text(json.dumps(items))
    (tmp_path / "labels.json").write_text(json.dumps({"Putting something on a surface": "1",
                                                      "Holding something next to something": "0"}))
    touch(tmp_path / "20bn" / "78687.webm")
    classes = read_class_list(tmp_path / "labels.json")
    assert classes == ["Holding something next to something", "Putting something on a surface"]
    m = load_manifest(tmp_path / "train.json", video_root=str(tmp_path / "20bn"), classes=classes)
    assert m.format == "ssv2" and [v.label for v in m.videos] == [0, 1]
    assert m.videos[0].path.endswith("78687.webm") and m.videos[1].video_id == "42326"


def test_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ManifestError, match="no videos found"):
        load_manifest(tmp_path / "empty.txt")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path / "x.json")
    (tmp_path / "dup.txt").write_text("a\na\n")
    with pytest.raises(ManifestError, match="appears twice"):
        read_class_list(tmp_path / "dup.txt")
