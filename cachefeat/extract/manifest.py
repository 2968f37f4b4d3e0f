"""Inputs: turn a data set description into an ordered list of videos with class indices.

Accepted (format detected from the path, or forced with --format):
- folder : DIR/<class>/<video>.mp4 (class = sub-folder name); videos directly in DIR are unlabelled
- list   : a text file, one video per line: `path<TAB>label` (a TAB between them: both may contain spaces,
           so class names such as "moving right" work), or `path label` without a TAB (the label is the last
           space-separated field, so only the path may contain spaces); label = class name or index; `path`
           alone means unlabelled; a line starting with `#` is a comment
- kinetics: CSV with header label,youtube_id,time_start,time_end,split; files are
           {youtube_id}_{time_start:06d}_{time_end:06d}.<ext> under the video root, flat or in class folders
- ssv2   : Something-Something JSON list of {id, template|label}; files are <id>.webm (or .mp4) under the
           video root; the class is the template with the brackets removed

A video may also be a frame folder: a directory of JPEG/PNG frames (video.IMAGE_EXTENSIONS), read in
natural name order, in every format: DIR/<class>/<video>/ in a folder tree, a directory's path in a list,
a directory named like the video's file (without extension) where Kinetics and SSv2 look for files.
Their timestamps need the rate the frames were extracted at (`extract --frame-rate`).

The class list comes from --classes (a text file, one name per line, or a JSON list, or a JSON
{name: index} map as SSv2's labels.json) or else from the labels found, sorted. Train and eval caches
must share one class list; pass the same --classes to both when a split may lack a class.

A video may also be an object in a bucket, `s3://bucket/key`: a line of a list that is such a URL, or, with
`--video-root s3://bucket/prefix`, every relative path of a list and every Kinetics and SSv2 name, joined to it
(flat: `{root}/{stem}.mp4`, `.webm` for SSv2; class folders are not looked for, as no object is looked up).
Loading checks the URLs' form only and sends no request: a missing object is a failure of that video when its
decode worker fetches it (fetch.py). The manifest may be an object in a bucket too (`s3://bucket/k400/train.csv`):
it is read whole (bounded), and its relative paths and names are then joined to its own folder in the bucket,
as a local list's are to its folder (unless --video-root names another root). A folder tree may be in a bucket
too (`s3://bucket/k400/train/`, or --format folder, or a name that no object has but objects lie under): its
objects are listed (paged, at most MAX_LISTED) and read as the same tree on disk; frame folders there are
refused in one line, as a decode worker fetches a video as one object.

A manifest is input from elsewhere like any file: its paths stay what it says (it may point anywhere on
purpose; they are only read, never written or deleted), but a file that is not text (a NUL byte, bytes that
are not UTF-8, control characters, a line longer than MAX_LINE, more than MAX_TEXT bytes) is refused in one
line naming the file and the line.

Nothing is dropped silently: a video that cannot be used as listed (label not in the class list, the same
file listed twice) keeps its row and carries a `problem`, which extraction records as a failure.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".3gp")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")   # frame folders (as video.IMAGE_EXTENSIONS)
FORMATS = ("auto", "folder", "list", "kinetics", "ssv2")
MAX_LINE = 64 << 10        # bytes of one line of a list, CSV or class list (Kinetics' longest: ~150)
MAX_TEXT = 1 << 30         # bytes of a manifest (Kinetics-700's train CSV: ~30 MB)
MAX_LISTED = 5_000_000     # objects of a folder tree in a bucket, held while listed (a key and a size each)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")   # no text file holds these (TAB, LF, CR are text)


class ManifestError(ValueError):
    """An input that cannot be read as a data set; the message says why."""


@dataclass(frozen=True)
class VideoEntry:
    path: str
    label: int             # class index, -1 if unknown
    video_id: str
    problem: str = ""      # non-empty: this row is recorded as a failure without decoding


@dataclass
class Manifest:
    videos: list[VideoEntry]
    classes: list[str]
    format: str
    source: str
    sha256: str

    def describe(self) -> dict:
        return {"input": self.source, "format": self.format, "sha256": self.sha256, "num_videos": len(self.videos)}


def read_class_list(path: str | os.PathLike) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise ManifestError(f"--classes {path}: no such file")
    text = _decode(p, _read(p, f"--classes {path}"), f"--classes {path}", lines=p.suffix != ".json")
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"--classes {path}: not valid JSON ({e})") from None
        if isinstance(data, dict):  # {name: index}
            try:
                return [k for k, _ in sorted(data.items(), key=lambda kv: int(kv[1]))]
            except (TypeError, ValueError):
                raise ManifestError(f"--classes {path}: a JSON object must map each class name to its index "
                                    f"(a whole number)") from None
        if not isinstance(data, list) or not all(isinstance(x, (str, int)) for x in data):
            raise ManifestError(f"--classes {path}: expected a JSON list of class names or an object "
                                f"{{name: index}}")
        return [str(x) for x in data]
    names = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if len(set(names)) != len(names):
        raise ManifestError(f"--classes {path}: a class name appears twice")
    return names


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "ssv2"
    if suffix == ".csv":
        return "kinetics"
    return "list"


def load_manifest(input_path: str | os.PathLike, fmt: str = "auto", video_root: str | None = None,
                  classes: list[str] | str | None = None, split: str | None = None) -> Manifest:
    if isinstance(classes, (str, os.PathLike)):    # before the input: a typo costs no listing of a bucket
        classes = read_class_list(classes)
    if is_url(str(input_path)):
        return _load_from_bucket(str(input_path), fmt, video_root, classes, split)
    path = Path(input_path)
    if not path.exists():
        raise ManifestError(f"input {input_path} does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if video_root and is_url(str(video_root)):     # a bucket: names are joined to it, nothing is looked up
        root = _bucket_root(str(video_root))
    else:
        root = Path(video_root) if video_root else (path if path.is_dir() else path.parent)
    reader = {"folder": _folder, "list": _text_list, "kinetics": _kinetics, "ssv2": _ssv2}.get(fmt)
    if reader is None:
        raise ManifestError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows, digest = reader(path, root, split)
    return _manifest(rows, digest, classes, fmt, str(path), split)


def _manifest(rows: list, digest: str, classes: list[str] | None, fmt: str, source: str, split) -> Manifest:
    """The Manifest of a reader's rows, (path or URL, label name or None, video id), wherever they were read:
    the class list, each label's index, and the problems of rows that cannot be used as listed."""
    if not rows:
        raise ManifestError(f"{source}: no videos found" + (f" for split {split!r}" if split else ""))
    if classes is None:
        found = {lab for _, lab, _ in rows if lab is not None}
        if found and all(lab.isdigit() for lab in found):  # integer labels without names: 0..max
            classes = [str(i) for i in range(max(int(lab) for lab in found) + 1)]
        else:
            classes = sorted(found)
    index = {c: i for i, c in enumerate(classes)}
    seen: dict[str, int] = {}
    videos = []
    check_url = _url_checker(rows)
    for i, (p, lab, vid) in enumerate(rows):
        problem, label = "", -1
        if lab is not None:
            label = _class_index(lab, index, classes)
            if label < 0:
                problem = f"label {lab!r} is not in the class list"
        url = is_url(p)
        if url:
            problem = check_url(p) or problem
        key = p if url else os.path.realpath(p)
        if key in seen:
            problem = f"duplicate of video {seen[key]} (same file listed twice)"
        else:
            seen[key] = i
        videos.append(VideoEntry(str(p), label, vid, problem))
    return Manifest(videos, list(classes), fmt, source, digest)


def _load_from_bucket(url: str, fmt: str, video_root, classes, split) -> Manifest:
    """A manifest that is an object in a bucket (a list, Kinetics CSV or SSv2 JSON): read whole, at most
    MAX_TEXT bytes (its size known before its body is read), into a temporary folder under its own name, and
    loaded from there as a local file is; its relative paths and names are joined to the URL's folder unless
    --video-root says otherwise.
    A prefix (a URL ending in `/`, --format folder, or a name that no object has but objects lie under) is a
    folder tree, listed (_bucket_tree). The Manifest, and every message, names the URL."""
    import tempfile

    from ..store.remote import Location, RemoteError, get_bounded_async, parse_url, run_sync
    try:
        loc = parse_url(url)
    except RemoteError as e:
        raise ManifestError(f"input {e}") from None
    key = loc.prefix
    name = key.rsplit("/", 1)[-1]
    if fmt == "folder" or not name or url.endswith("/"):
        if fmt not in ("auto", "folder"):
            raise ManifestError(f"input {url}: a prefix is read as a folder tree (--format folder), not as a {fmt} "
                                f"manifest; give the manifest object's URL")
        rows, digest, _ = _bucket_tree(url, loc)
        return _manifest(rows, digest, classes, "folder", url, split)
    bucket = Location(loc.bucket, "")

    def too_big(size):
        return ManifestError(f"input {url}: {size} bytes, more than a manifest holds ({MAX_TEXT >> 20} MiB at "
                             f"most): not a text file")
    try:
        raw = run_sync(get_bounded_async(bucket, key, MAX_TEXT, refuse=too_big))
    except FileNotFoundError:
        raw = None
    if raw is None:     # no such object: a folder tree when objects lie under the name, as a local DIR
        rows, digest, listed = _bucket_tree(url, loc) if fmt == "auto" else ([], "", 0)
        if not listed:
            raise ManifestError(f"input {url} does not exist")
        return _manifest(rows, digest, classes, "folder", url, split)
    parent = url.rsplit("/", 1)[0]
    with tempfile.TemporaryDirectory(prefix="cachefeat-manifest-") as folder:
        local = Path(folder) / name
        local.write_bytes(raw)
        try:
            m = load_manifest(local, fmt, video_root or parent, classes, split)
        except ManifestError as e:
            raise ManifestError(str(e).replace(str(local), url)) from None
    return replace(m, source=url)


def _bucket_tree(url: str, loc) -> tuple[list, str, int]:
    """A folder tree under a bucket's prefix, read as _folder reads one on disk (_tree): rows, digest, and the
    number of objects listed. At most MAX_LISTED objects are listed (a listing is held whole); frame folders
    are refused, as a decode worker fetches a video as one object."""
    from ..store.layout import UnsafeStore
    from ..store.remote import list_objects
    try:
        objects = list_objects(loc, limit=MAX_LISTED + 1)
    except UnsafeStore:     # obstore stops the listing at a key it cannot name (an empty, '.' or '..' part)
        raise ManifestError(f"input {url}: an object under it has a name with an empty, '.' or '..' part; rename "
                            f"it, or list the other videos in a text file") from None
    if len(objects) > MAX_LISTED:
        raise ManifestError(f"input {url}: more than {MAX_LISTED:,} objects under it; list its videos in a text "
                            f"file, or give a prefix that holds fewer")
    found, frames = [], []
    for key, size in objects.items():
        parts = tuple(key.split("/"))
        if _is_frame(parts[-1]) and len(parts) > 1:
            frames.append(key)
        elif _looks_like_video(key):
            found.append((parts, f"{loc.url}/{key}", size, False))
    if frames:
        raise ManifestError(f"input {url}: {len(frames)} image objects (such as {loc.url}/{min(frames)}) make frame "
                            f"folders, which are read from local disk only (a video in a bucket is fetched as one "
                            f"object); copy them to disk")
    return *_tree(found), len(objects)


def is_url(path: str) -> bool:
    """A video in an object store (`s3://bucket/key`): fetched by the decode worker that decodes it."""
    return path.startswith("s3://")


def _bucket_root(url: str) -> str:
    """--video-root s3://bucket/prefix, checked (the name only: no request), without a trailing slash."""
    from ..store.remote import RemoteError, parse_url
    try:
        return parse_url(url).url
    except RemoteError as e:
        raise ManifestError(f"--video-root {e}") from None


def _url_checker(rows: list):
    """The check of one video URL (the name only: a missing object fails when its worker fetches it); a
    manifest with URLs and no obstore is refused whole, in one line."""
    if not any(is_url(p) for p, _, _ in rows):
        return None
    from ..store.remote import RemoteError, parse_url, require_obstore
    try:
        require_obstore("s3://")
    except RemoteError:
        raise ManifestError("the input lists s3:// videos: fetching them needs obstore: pip install "
                            "'cachefeat[s3]'") from None

    def check(url: str) -> str:
        try:
            if not parse_url(url).prefix:
                return f"{url} names a bucket, not a video in it"
        except RemoteError as e:
            return str(e)
        return ""
    return check


def _join(root, name: str) -> str:
    """`name` under the video root: a folder, or a bucket URL (joined with `/`)."""
    return f"{root}/{name}" if isinstance(root, str) else str(root / name)


def _without_suffix(p: str) -> str:
    return os.path.splitext(p)[0] if is_url(p) else str(Path(p).with_suffix(""))


def _class_index(label: str, index: dict, classes: list[str]) -> int:
    if label in index:
        return index[label]
    if label.isdigit():  # an index into the class list
        i = int(label)
        return i if i < len(classes) else -1
    return -1


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _folder(path: Path, root: Path, split):
    found = []
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        here = Path(dirpath)
        frames = [f for f in files if _is_frame(f)]
        if frames and here != path:      # a frame folder is one video: its subfolders are not searched
            dirs[:] = []
            found.append((here.relative_to(path).parts, str(here), len(frames), True))
            continue
        found += [((here / f).relative_to(path).parts, str(here / f), os.path.getsize(here / f), False)
                  for f in files if _looks_like_video(f)]
    return _tree(found)


def _tree(found: list) -> tuple[list, str]:
    """Rows and digest of a folder tree, on disk or in a bucket. `found` holds, for each video, its path's
    parts under the tree's root, its path or URL, its size in bytes (a frame folder: its number of frames) and
    whether it is a frame folder. The class is the first folder under the root (a video at the top is
    unlabelled), the id the relative path without its suffix; the digest covers paths and sizes, so a resume
    sees a changed tree."""
    rows, listing = [], []
    for parts, full, n, folder in sorted(found):
        rel = PurePosixPath(*parts)
        rows.append((full, parts[0] if len(parts) > 1 else None, str(rel if folder else rel.with_suffix(""))))
        listing.append(f"{full}/\t{n} frames" if folder else f"{full}\t{n}")
    return rows, _sha("\n".join(listing).encode())


def _is_frame(name: str) -> bool:
    """A frame of a frame folder (video.IMAGE_EXTENSIONS), not hidden."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _text_list(path: Path, root: Path, split):
    raw = _read(path)
    rows = []
    for line in _decode(path, raw).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:                       # path<TAB>label: either may hold spaces
            p, _, label = (x.strip() for x in line.rpartition("\t"))
            label = label or None
        else:
            parts = line.rsplit(None, 1)
            if len(parts) == 2 and not _looks_like_video(parts[1]):
                p, label = parts
            else:
                p, label = line, None
        full = p if is_url(p) or os.path.isabs(p) else _join(root, p)
        rows.append((full, label, _without_suffix(p)))
    return rows, _sha(raw)


def _read(path: Path, what: str | None = None) -> bytes:
    """A manifest's bytes, refused unread when there are more than any manifest has."""
    size = path.stat().st_size
    if size > MAX_TEXT:
        raise ManifestError(f"{what or path}: {size} bytes, more than a manifest holds ({MAX_TEXT >> 20} MiB at "
                            f"most): not a text file")
    return path.read_bytes()


def _decode(path: Path, raw: bytes, what: str | None = None, lines: bool = True) -> str:
    """A manifest's text: UTF-8 (with or without a byte-order mark) without NUL bytes or other control
    characters, each line (`lines`) at most MAX_LINE bytes; else one line saying where it is not."""
    what = what or str(path)
    if b"\x00" in raw:
        line = raw[:raw.index(b"\x00")].count(b"\n") + 1
        raise ManifestError(f"{what}: line {line} holds a NUL byte: not a text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ManifestError(f"{what}: line {line} is not UTF-8 text (byte {raw[e.start]:#04x}); save the "
                            f"file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    bad = _CONTROL.search(text)
    if bad:
        line = text[:bad.start()].count("\n") + 1
        raise ManifestError(f"{what}: line {line} holds the control character {ord(bad.group()):#04x}: not a text "
                            f"file")
    start, line = 0, 1
    while lines:
        end = raw.find(b"\n", start)
        end = len(raw) if end < 0 else end
        if end - start > MAX_LINE:
            raise ManifestError(f"{what}: line {line} is longer than {MAX_LINE} bytes: not a manifest line (a "
                                f"binary file?)")
        if end == len(raw):
            break
        start, line = end + 1, line + 1
    return text


def _looks_like_video(token: str) -> bool:
    return Path(token).suffix.lower() in VIDEO_EXTENSIONS


def _kinetics(path: Path, root: Path, split):
    raw = _read(path)
    reader = csv.DictReader(_decode(path, raw).splitlines())
    try:
        rows = _kinetics_rows(path, root, split, reader)
    except csv.Error as e:     # a quoted field running over many lines, past csv's field size limit
        raise ManifestError(f"{path}, line {reader.line_num}: not a CSV row ({e})") from None
    return rows, _sha(raw + (split or "").encode())


def _kinetics_rows(path: Path, root: Path, split, reader: csv.DictReader) -> list:
    need = {"youtube_id", "time_start", "time_end"}
    if not reader.fieldnames or not need <= set(reader.fieldnames):
        raise ManifestError(f"{path}: a Kinetics CSV needs the columns label,youtube_id,time_start,time_end,split "
                            f"(found {reader.fieldnames})")
    rows = []
    for r in reader:
        if split and r.get("split") and r["split"] != split:
            continue
        try:
            stem = f"{r['youtube_id']}_{int(float(r['time_start'])):06d}_{int(float(r['time_end'])):06d}"
        except (TypeError, ValueError, OverflowError):
            raise ManifestError(f"{path}, line {reader.line_num}: time_start and time_end must be numbers of seconds "
                                f"(found {r['time_start']!r}, {r['time_end']!r})") from None
        label = r.get("label") or None
        rows.append((str(_find_video(root, stem, label)), label, stem))
    return rows


def _ssv2(path: Path, root: Path, split):
    raw = _read(path)    # JSON: one line may hold it all; json.loads refuses NUL bytes and binary
    try:
        items = json.loads(raw)
    except ValueError as e:   # not JSON, or not UTF-8/16/32
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(items, list):
        raise ManifestError(f"{path}: a Something-Something JSON is a list of objects with an 'id'")
    rows = []
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("id"), (str, int)) or not all(
                isinstance(it.get(k), (str, type(None))) for k in ("template", "label")):
            raise ManifestError(f"{path}: item {i + 1} is not an object with an 'id' (and a text 'template' or "
                                f"'label'); a Something-Something JSON is a list of such objects")
        label = it.get("template") or it.get("label")
        label = label.replace("[", "").replace("]", "") if label else None
        vid = str(it["id"])
        rows.append((str(_find_video(root, vid, None, (".webm", ".mp4"))), label, vid))
    return rows, _sha(raw)


def _find_video(root: Path | str, stem: str, label: str | None, exts=VIDEO_EXTENSIONS) -> Path | str:
    """The file for `stem`: flat under root or in the class folder, or a frame folder named `stem` there;
    the .mp4 path when none exists (it is then recorded as missing, not dropped). Under a bucket (root an
    `s3://` URL) the flat name with the first extension, unchecked: a request per video would be 240,000 for
    Kinetics-400, and a missing object fails when its worker fetches it."""
    if isinstance(root, str):
        return _join(root, f"{stem}{exts[0]}")
    folders = [root] + ([root / label, root / label.replace(" ", "_")] if label else [])
    for folder in folders:
        try:
            for ext in exts:
                p = folder / f"{stem}{ext}"
                if p.exists():
                    return p
            if (folder / stem).is_dir():
                return folder / stem
        except OSError:      # a name no file system holds (too long): not there
            continue
    return folders[-1] / f"{stem}{exts[0]}"
