"""The shard format (webdataset tars), its writer with a CLI, and the sample decoder.

Layout: one sample = the tar members sharing a key (`{key}.{ext}`); keys are 9-digit indices,
never containing a dot. Five sample kinds:

    caption      {key}.jpg|png|webp + {key}.txt (+ {key}.json metadata, e.g. from img2dataset)
    qa           {key}.png + {key}.json = {"question": ..., "answer": ...}
    interleaved  {key}.json = {"pieces": [{"text": "..."}, {"image": "0.png"}, ...]}
                 + {key}.0.png, {key}.1.jpg, ... (each "image" names the member's extension)
    chat         {key}.json = {"messages": [{"role": "system"|"user"|"assistant",
                                             "content": [{"text": "..."}, {"image": "0.png"}, ...]}]}
                 + {key}.0.png, ... as for interleaved
    text         {key}.txt

`decode_sample` maps a sample to a document (data_pipelines/document.py): caption → [image,
caption]; qa → [image, "Question: q Answer:", Answer(" a")]; interleaved → its pieces; chat → a
`Chat` (rendered with the tokenizer's chat template when tokenised); text → [text].

Writer sources (CLI `cmoe-shards SOURCE INPUT --out DIR`):
    img2dataset  a folder (searched recursively) of NNNN.jpg + NNNN.txt (+ NNNN.json)
    pairs        JSONL of {"image": path, "text": caption}
    qa           JSONL of {"image": path, "question": str, "answer": str}           -> qa
    llava        LLaVA JSON (a list) or JSONL of {"image": path | [paths], "conversations":
                 [{"from": "human" | "gpt" | "system", "value": "<image>\n..."}]}  -> chat
    messages     JSONL of {"messages": [{"role", "content": str | [{"type": "text", "text"} |
                 {"type": "image"[, "image": path]}]}], "images": [paths]}      -> chat
                 (transformers / TRL style: an image part without a path, or an `<image>`
                 marker in a string content, takes the next of "images")
    interleaved  JSONL of {"pieces": [{"text": ...} | {"image": path}]}
                 or OBELICS-style {"texts": [str|null], "images": [path|null]}
    text         JSONL of {"text": ...}
Image paths are relative to the input file's folder (or --image-root). In a chat, an image with no
`<image>` marker in its turn goes first in the first user turn (LLaVA's convention). Inputs that cannot be used are
skipped and listed with their reason in `DIR/manifest.json` beside per-shard sample counts.
"""
from __future__ import annotations

import argparse
import io
import json
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from cmoe_base.commands import InputError, Parser, command, positive_float, positive_int
from cmoe_base.outputs import check_output, staged_folder
from data_pipelines.errors import BadSample
from data_pipelines.images import to_rgb
from data_pipelines.chat import IMAGE_MARKER, ROLES, Chat, Message
from data_pipelines.document import Answer

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Images with more pixels are skipped (image_too_large) from their header, before decoding: 36 MP decodes
# to ~108 MB of RGB per worker, while a 450 KB PNG of 144 MP took +1.0 GB and 5 s to decode (2-core CPU).
# It keeps 6000x6000 photos and A4 scans at 600 dpi (35 MP); `data.max_image_pixels` changes it (Pillow
# itself refuses above 179 MP).
MAX_IMAGE_PIXELS = 36_000_000
MANIFEST = "manifest.json"
Piece = str | Image.Image


# ----------------------------------------------------------------------------- reading samples

def qa_prompt(question: str) -> str:
    return f"Question: {question} Answer:"


def qa_pieces(question: str, answer: str) -> list[str]:
    """The text of a qa sample: the prompt, then the answer (an `Answer`: the LM loss target with
    data.loss_on = answers). Evaluation scores " " + answer after `qa_prompt`: the same layout."""
    return [qa_prompt(question), Answer(f" {answer}")]


def decode_image(data: bytes, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """RGB image from encoded bytes; raises BadSample (bad_image, or image_too_large when its header
    says it has more than `max_pixels` pixels: nothing is decoded then)."""
    try:
        with warnings.catch_warnings():  # Pillow warns from 89 MP: our own limit decides, and counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise BadSample("image_too_large", f"{img.width}x{img.height} = {img.width * img.height / 1e6:.1f} MP "
                                               f"> data.max_image_pixels = {max_pixels / 1e6:g} MP")
        img.load()
        return to_rgb(img)
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for corrupt or truncated files
        raise BadSample("bad_image", f"{type(e).__name__}: {e}") from None


def decode_text(data: bytes, reason: str = "missing_caption") -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("bad_caption", str(e)) from None
    if not text.strip():
        raise BadSample(reason, "empty text")
    return text


def decode_json(data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample("bad_json", str(e)) from None
    if not isinstance(obj, dict):
        raise BadSample("bad_json", f"top level is {type(obj).__name__}, expected an object")
    return obj


def _image_field(fields: dict[str, bytes]) -> str | None:
    return next((ext for ext in IMAGE_EXTS if ext in fields), None)


def _interleaved_pieces(meta: dict[str, Any], fields: dict[str, bytes], max_pixels: int | None) -> list[Piece]:
    pieces = meta["pieces"]
    if not isinstance(pieces, list) or not pieces:
        raise BadSample("bad_json", "'pieces' must be a non-empty list")
    out: list[Piece] = []
    for i, piece in enumerate(pieces):
        if isinstance(piece, dict) and isinstance(piece.get("text"), str):
            out.append(piece["text"])
        elif isinstance(piece, dict) and isinstance(piece.get("image"), str):
            if piece["image"] not in fields:
                raise BadSample("missing_image", f"pieces[{i}] names {piece['image']!r}, not in the sample")
            out.append(decode_image(fields[piece["image"]], max_pixels))
        else:
            raise BadSample("bad_json", f"pieces[{i}] must be {{'text': str}} or {{'image': str}}")
    return out


def _chat(meta: dict[str, Any], fields: dict[str, bytes], max_pixels: int | None) -> Chat:
    messages = meta["messages"]
    if not isinstance(messages, list) or not messages:
        raise BadSample("bad_json", "'messages' must be a non-empty list")
    chat = Chat()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), list):
            raise BadSample("bad_json", f"messages[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': [...]}}")
        chat.append(Message(m["role"], _interleaved_pieces({"pieces": m["content"]}, fields, max_pixels)))
    if not any(m.role == "assistant" for m in chat):
        raise BadSample("bad_json", "a chat needs at least one assistant message")
    return chat


def decode_sample(raw: dict[str, Any], max_pixels: int | None = MAX_IMAGE_PIXELS) -> list[Piece] | Chat:
    """Pieces of one webdataset sample (see the module docstring); raises BadSample. A sample the
    reader already rejected (`__skip__`: reason, detail) raises its reason."""
    if "__skip__" in raw:
        raise BadSample(*raw["__skip__"])
    fields = {k: v for k, v in raw.items() if not k.startswith("__")}
    if not any(len(v) for v in fields.values()):
        raise BadSample("empty_sample", "no members" if not fields else "all members are empty")
    image_key = _image_field(fields)
    if "txt" in fields:
        if image_key is None:
            return [decode_text(fields["txt"], reason="empty_sample")]
        caption = decode_text(fields["txt"])
        return [decode_image(fields[image_key], max_pixels), caption]
    if "json" in fields:
        meta = decode_json(fields["json"])
        if "pieces" in meta:
            return _interleaved_pieces(meta, fields, max_pixels)
        if "messages" in meta:
            return _chat(meta, fields, max_pixels)
        if "question" in meta and "answer" in meta:
            q, a = meta["question"], meta["answer"]
            if not (isinstance(q, str) and isinstance(a, str)):
                raise BadSample("bad_json", f"'question' and 'answer' must be strings, got "
                                            f"{type(q).__name__} and {type(a).__name__}")
            if image_key is None:
                raise BadSample("missing_image", "qa sample without an image")
            return [decode_image(fields[image_key], max_pixels), *qa_pieces(q, a)]
        if image_key is not None:
            raise BadSample("missing_caption", "image with metadata but no .txt")
        raise BadSample("bad_json", "expected 'pieces', 'messages' or 'question'/'answer'")
    if image_key is not None:
        raise BadSample("missing_caption", "image without .txt")
    raise BadSample("empty_sample", f"no usable members in {sorted(fields)}")


# ----------------------------------------------------------------------------- sources

@dataclass
class Skipped:
    """An input that the writer could not turn into a sample."""

    input: str
    reason: str
    detail: str = ""


Sample = dict[str, bytes]  # extension → bytes, without __key__
SourceItem = Sample | Skipped


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext


def read_image_file(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of an image file that decodes; raises BadSample."""
    if not path.is_file():
        raise BadSample("missing_image", str(path))
    data = path.read_bytes()
    decode_image(data)
    if _ext(path) not in IMAGE_EXTS:
        raise BadSample("bad_image", f"unsupported extension {path.suffix!r} (use {', '.join(IMAGE_EXTS)})")
    return _ext(path), data


def img2dataset_folder(folder: str | Path) -> Iterator[SourceItem]:
    """Samples from a folder in img2dataset layout: NNNN.jpg + NNNN.txt (+ NNNN.json)."""
    stems: dict[Path, dict[str, Path]] = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and (_ext(path) in IMAGE_EXTS or _ext(path) in ("txt", "json")):
            stems.setdefault(path.with_suffix(""), {})[_ext(path)] = path
    for stem, files in stems.items():
        try:
            image = next((files[e] for e in IMAGE_EXTS if e in files), None)
            if image is None:
                raise BadSample("missing_image", "no image file")
            if "txt" not in files:
                raise BadSample("missing_caption", "no .txt file")
            ext, data = read_image_file(image)
            sample = {ext: data, "txt": decode_text(files["txt"].read_bytes()).encode("utf-8")}
            if "json" in files:
                decode_json(files["json"].read_bytes())
                sample["json"] = files["json"].read_bytes()
            yield sample
        except BadSample as e:
            yield Skipped(str(stem), e.reason, e.detail)


def _jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any] | Skipped]]:
    for n, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            yield where, decode_json(line.encode("utf-8"))
        except BadSample as e:
            yield where, Skipped(where, e.reason, e.detail)


def jsonl_pairs(path: str | Path) -> Iterator[SourceItem]:
    """Samples from JSONL lines {"image": path, "text": caption}."""
    root = Path(path).parent
    for where, obj in _jsonl(path):
        if isinstance(obj, Skipped):
            yield obj
            continue
        try:
            if not isinstance(obj.get("text"), str) or not obj["text"].strip():
                raise BadSample("missing_caption", "'text' missing or empty")
            if not isinstance(obj.get("image"), str):
                raise BadSample("missing_image", "'image' missing")
            ext, data = read_image_file(root / obj["image"])
            yield {ext: data, "txt": obj["text"].encode("utf-8")}
        except BadSample as e:
            yield Skipped(where, e.reason, e.detail)


def _obelics_pieces(obj: dict[str, Any]) -> list[dict[str, str]]:
    texts, images = obj.get("texts"), obj.get("images")
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise BadSample("bad_json", "need 'pieces', or 'texts' and 'images' lists of equal length")
    return [{"text": t} if t is not None else {"image": i} for t, i in zip(texts, images) if (t, i) != (None, None)]


def jsonl_interleaved(path: str | Path) -> Iterator[SourceItem]:
    """Samples from JSONL interleaved documents (ordered text pieces and image paths)."""
    root = Path(path).parent
    for where, obj in _jsonl(path):
        if isinstance(obj, Skipped):
            yield obj
            continue
        try:
            pieces = obj["pieces"] if "pieces" in obj else _obelics_pieces(obj)
            if not isinstance(pieces, list) or not pieces:
                raise BadSample("empty_sample", "no pieces")
            sample: Sample = {}
            stored: list[dict[str, str]] = []
            for i, piece in enumerate(pieces):
                if isinstance(piece, dict) and isinstance(piece.get("text"), str):
                    stored.append({"text": piece["text"]})
                elif isinstance(piece, dict) and isinstance(piece.get("image"), str):
                    ext, data = read_image_file(root / piece["image"])
                    name = f"{sum('image' in p for p in stored)}.{ext}"
                    sample[name] = data
                    stored.append({"image": name})
                else:
                    raise BadSample("bad_json", f"pieces[{i}] must be {{'text': str}} or {{'image': path}}")
            sample["json"] = json.dumps({"pieces": stored}, ensure_ascii=False).encode("utf-8")
            yield sample
        except BadSample as e:
            yield Skipped(where, e.reason, e.detail)


def jsonl_text(path: str | Path) -> Iterator[SourceItem]:
    """Samples from JSONL lines {"text": document}."""
    for where, obj in _jsonl(path):
        if isinstance(obj, Skipped):
            yield obj
        elif not isinstance(obj.get("text"), str) or not obj["text"].strip():
            yield Skipped(where, "empty_sample", "'text' missing or empty")
        else:
            yield {"txt": obj["text"].encode("utf-8")}


def jsonl_qa(path: str | Path, image_root: str | Path | None = None) -> Iterator[SourceItem]:
    """qa samples from JSONL lines {"image": path, "question": str, "answer": str}."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    for where, obj in _jsonl(path):
        if isinstance(obj, Skipped):
            yield obj
            continue
        try:
            q, a = obj.get("question"), obj.get("answer")
            if not (isinstance(q, str) and q.strip() and isinstance(a, str) and a.strip()):
                raise BadSample("bad_json", "'question' and 'answer' must be non-empty strings")
            if not isinstance(obj.get("image"), str):
                raise BadSample("missing_image", "'image' missing")
            ext, data = read_image_file(root / obj["image"])
            yield {ext: data, "json": json.dumps({"question": q, "answer": a}, ensure_ascii=False).encode("utf-8")}
        except BadSample as e:
            yield Skipped(where, e.reason, e.detail)


def _marked(text: str, images: list[str]) -> list[dict[str, str]]:
    """Content parts of a text with `<image>` markers, each marker taking the next of `images` (consumed)."""
    parts: list[dict[str, str]] = []
    for i, chunk in enumerate(text.split(IMAGE_MARKER)):
        if i:
            if not images:
                raise BadSample("missing_image", f"more {IMAGE_MARKER} markers than images")
            parts.append({"image": images.pop(0)})
        if chunk:
            parts.append({"text": chunk})
    return parts


def chat_sample(messages: list[tuple[str, list[dict[str, str]]]], root: Path, leftover: list[str]) -> Sample:
    """A chat sample from (role, parts) messages whose image parts hold paths under `root`; images not
    placed by a marker (`leftover`) go first in the first user turn. Raises BadSample."""
    if leftover:
        first_user = next((i for i, (role, _) in enumerate(messages) if role == "user"), None)
        if first_user is None:
            raise BadSample("bad_json", "an image but no user turn to put it in")
        role, parts = messages[first_user]
        messages[first_user] = (role, [{"image": p} for p in leftover] + parts)
    if not any(role == "assistant" for role, _ in messages):
        raise BadSample("bad_json", "no assistant turn")
    sample: Sample = {}
    stored = []
    for role, parts in messages:
        content = []
        for part in parts:
            if "image" in part:
                ext, data = read_image_file(root / part["image"])
                name = f"{sum(1 for k in sample if k != 'json')}.{ext}"
                sample[name] = data
                content.append({"image": name})
            else:
                content.append({"text": part["text"]})
        stored.append({"role": role, "content": content})
    sample["json"] = json.dumps({"messages": stored}, ensure_ascii=False).encode("utf-8")
    return sample


LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _json_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any] | Skipped]]:
    """Records of a JSON file holding a list (LLaVA's format) or of a JSONL file."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            yield str(path), Skipped(str(path), "bad_json", str(e))
            return
        for n, obj in enumerate(records):
            where = f"{path}[{n}]"
            yield where, obj if isinstance(obj, dict) else Skipped(where, "bad_json", "record is not an object")
        return
    yield from _jsonl(path)


def llava_conversations(path: str | Path, image_root: str | Path | None = None) -> Iterator[SourceItem]:
    """chat samples from LLaVA's format: {"image": path | [paths], "conversations": [{"from", "value"}]}."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    for where, obj in _json_records(path):
        if isinstance(obj, Skipped):
            yield obj
            continue
        try:
            images = obj.get("image") or []
            images = [images] if isinstance(images, str) else list(images)
            turns = obj.get("conversations")
            if not isinstance(turns, list) or not turns:
                raise BadSample("bad_json", "'conversations' must be a non-empty list")
            messages = []
            for i, t in enumerate(turns):
                if not isinstance(t, dict) or t.get("from") not in LLAVA_ROLES or not isinstance(t.get("value"), str):
                    raise BadSample("bad_json", f"conversations[{i}] must be {{'from': one of "
                                                f"{', '.join(LLAVA_ROLES)}, 'value': str}}")
                messages.append((LLAVA_ROLES[t["from"]], _marked(t["value"].strip() if i == 0 else t["value"], images)))
            yield chat_sample(messages, root, images)
        except BadSample as e:
            yield Skipped(where, e.reason, e.detail)


def jsonl_messages(path: str | Path, image_root: str | Path | None = None) -> Iterator[SourceItem]:
    """chat samples from transformers-style JSONL: {"messages": [{"role", "content"}], "images": [paths]}."""
    root = Path(image_root) if image_root is not None else Path(path).parent
    for where, obj in _jsonl(path):
        if isinstance(obj, Skipped):
            yield obj
            continue
        try:
            images = list(obj.get("images") or [])
            if not all(isinstance(i, str) for i in images):
                raise BadSample("bad_json", "'images' must be a list of paths")
            raw = obj.get("messages")
            if not isinstance(raw, list) or not raw:
                raise BadSample("bad_json", "'messages' must be a non-empty list")
            messages = []
            for i, m in enumerate(raw):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise BadSample("bad_json", f"messages[{i}] needs a role, one of {', '.join(ROLES)}")
                content = m.get("content")
                if isinstance(content, str):
                    parts = _marked(content, images)
                elif isinstance(content, list):
                    parts = []
                    for part in content:
                        kind = part.get("type") if isinstance(part, dict) else None
                        if kind == "text" and isinstance(part.get("text"), str):
                            parts.append({"text": part["text"]})
                        elif kind == "image":
                            path_ = part.get("image") or part.get("path") or part.get("url")
                            if path_ is None:
                                if not images:
                                    raise BadSample("missing_image", f"messages[{i}] has more images than 'images'")
                                path_ = images.pop(0)
                            parts.append({"image": path_})
                        else:
                            raise BadSample("bad_json", f"messages[{i}]: content parts must be "
                                                        f"{{'type': 'text', 'text': str}} or {{'type': 'image'}}")
                else:
                    raise BadSample("bad_json", f"messages[{i}]: content must be a string or a list of parts")
                messages.append((m["role"], parts))
            yield chat_sample(messages, root, images)
        except BadSample as e:
            yield Skipped(where, e.reason, e.detail)


SOURCES = {"img2dataset": img2dataset_folder, "pairs": jsonl_pairs, "qa": jsonl_qa, "llava": llava_conversations,
           "messages": jsonl_messages, "interleaved": jsonl_interleaved, "text": jsonl_text}
IMAGE_ROOT_SOURCES = ("qa", "llava", "messages")  # sources that take --image-root


# ----------------------------------------------------------------------------- writer

def write_shards(
    items: Iterable[SourceItem],
    out_dir: str | Path,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    total: int | None = None,
    desc: str = "writing shards",
) -> dict[str, Any]:
    """Write samples to `out_dir/shard-NNNNNN.tar` and `out_dir/manifest.json`; returns the manifest.

    Tar members get mtime 0, so the same samples always give byte-identical shards. The folder is
    built beside `out_dir` and renamed into place whole (cmoe_base.outputs): an interrupted rewrite
    leaves the previous shard set as it was, never old and new shards mixed.
    """
    with staged_folder(out_dir) as tmp:
        return _write_shards(items, tmp, maxcount, maxsize, total, desc)


def _write_shards(items: Iterable[SourceItem], out: Path, maxcount: int, maxsize: float, total: int | None,
                  desc: str) -> dict[str, Any]:
    import webdataset as wds  # here, not at import: it takes seconds (it loads torch); readers of this module need none

    per_shard: Counter[str] = Counter()
    skipped: list[dict[str, str]] = []
    writer = wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=0.0)
    try:
        for item in tqdm(items, total=total, desc=desc, unit="sample", leave=False):
            if isinstance(item, Skipped):
                skipped.append({"input": item.input, "reason": item.reason, "detail": item.detail})
                continue
            writer.write({"__key__": f"{sum(per_shard.values()):09d}", **item})
            per_shard[Path(writer.fname).name] += 1
    finally:
        writer.close()
    for tar in out.glob("shard-*.tar"):  # ShardWriter opens its first shard even when nothing comes
        if per_shard[tar.name] == 0:
            tar.unlink()
    shards = [{"path": name, "samples": n, "bytes": (out / name).stat().st_size} for name, n in sorted(per_shard.items())]
    manifest = {
        "samples": sum(per_shard.values()),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
        "skipped_counts": dict(sorted(Counter(s["reason"] for s in skipped).items())),
        "skipped": skipped,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(shard_dir) / MANIFEST).read_text())


@command("cmoe-shards")
def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="cmoe-shards", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=sorted(SOURCES), help="input kind")
    parser.add_argument("input", help="folder (img2dataset), JSONL file, or JSON list (llava)")
    parser.add_argument("--image-root", help=f"folder image paths are relative to ({', '.join(IMAGE_ROOT_SOURCES)}; "
                                             f"default: the input file's folder)")
    parser.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar + manifest.json (new or "
                                                     "empty; see --replace)")
    parser.add_argument("--replace", action="store_true", help="replace a non-empty --out folder (whole, atomically)")
    parser.add_argument("--maxcount", type=positive_int, default=1000, help="max samples per shard")
    parser.add_argument("--maxsize", type=positive_float, default=1e9, help="max bytes per shard")
    args = parser.parse_args(argv)
    if args.image_root is not None and args.source not in IMAGE_ROOT_SOURCES:
        parser.error(f"--image-root applies to {', '.join(IMAGE_ROOT_SOURCES)}, not {args.source}")
    if not Path(args.input).exists():
        raise InputError(f"{args.input}: no such file or folder")
    check_output(args.out, [args.input, args.image_root], args.replace)
    extra = {"image_root": args.image_root} if args.source in IMAGE_ROOT_SOURCES else {}
    manifest = write_shards(SOURCES[args.source](args.input, **extra), args.out, args.maxcount, args.maxsize)
    print(f"{manifest['samples']} samples, {manifest['bytes']} bytes in {len(manifest['shards'])} shards; "
          f"skipped {manifest['skipped_counts'] or 0} → {Path(args.out) / MANIFEST}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
