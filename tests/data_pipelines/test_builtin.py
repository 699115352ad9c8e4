import hashlib
from collections import Counter

from data_pipelines.builtin import builtin_samples, main, write_builtin_dataset
from data_pipelines.loader import read_tar
from data_pipelines.document import Answer
from data_pipelines.shards import decode_sample, load_manifest


def digest(sample: dict) -> str:
    return hashlib.sha256(b"".join(k.encode() + sample[k] for k in sorted(sample) if not k.startswith("__"))).hexdigest()


def test_same_seed_gives_identical_shards(tmp_path, builtin_dirs):
    again = write_builtin_dataset(tmp_path, num_train=300, num_heldout=60, maxcount=50, text_chars=600)
    for split in ("train", "heldout"):
        ours = sorted(builtin_dirs[split].glob("*.tar"))
        assert len(ours) == len(list(again[split].glob("*.tar"))) > 0
        for tar in ours:
            assert tar.read_bytes() == (again[split] / tar.name).read_bytes()


def test_heldout_is_disjoint_and_every_kind_is_present(builtin_dirs):
    digests = {}
    for split in ("train", "heldout"):
        samples = [s for tar in sorted(builtin_dirs[split].glob("*.tar")) for s in read_tar(str(tar))]
        assert len(samples) == load_manifest(builtin_dirs[split])["samples"]
        digests[split] = {digest(s) for s in samples}
        assert all(decode_sample(s) for s in samples)
    assert not digests["train"] & digests["heldout"]
    kinds = Counter("interleaved" if "0.png" in s else "qa" if "json" in s and "txt" not in s
                    else "caption" if "png" in s else "text" for s in builtin_samples(200, seed=5))
    assert set(kinds) == {"caption", "qa", "interleaved", "text"}


def test_captions_describe_the_images():
    texts = [decode_sample({"__key__": "x", **s}) for s in builtin_samples(60, seed=1)]
    captions = [p[1] for p in texts if len(p) == 2 and not isinstance(p[0], str)]
    assert any("circle" in c or "square" in c or "triangle" in c or "written in" in c for c in captions)
    qa = [p for p in texts if len(p) == 3 and isinstance(p[2], Answer)]  # [image, "Question: q Answer:", " a"]
    assert qa and all(p[1].startswith("Question: ") and p[1].endswith(" Answer:") and p[2].startswith(" ") for p in qa)
    long_docs = [p[0] for p in texts if len(p) == 1 and isinstance(p[0], str)]
    assert any("pass key is" in d for d in long_docs)


def test_cli(tmp_path):
    main(["--out", str(tmp_path), "--num-train", "20", "--num-heldout", "5"])
    assert load_manifest(tmp_path / "train")["samples"] == 20 and load_manifest(tmp_path / "heldout")["samples"] == 5


def test_object_masks_match_the_drawn_pixels():
    import numpy as np

    from data_pipelines.builtin import COLOURS, builtin_documents

    scenes = texts = 0
    for _, drawings in builtin_documents(80, seed=2):
        for d in drawings:
            pixels = np.asarray(d.image).astype(int)
            assert d.labels.shape == pixels.shape[:2] and d.labels.max() == len(d.objects)
            for i, o in enumerate(d.objects):
                mask = d.labels == i + 1
                colour = np.array(COLOURS[o.colour])
                if o.shape == "text":  # anti-aliased ink over a light background: close to the colour
                    texts += 1
                    assert mask.sum() > 20 and np.median(np.abs(pixels[mask] - colour).max(1)) < 60
                    continue
                scenes += 1
                assert (pixels[mask] == colour).all() and mask.sum() > 40  # shapes are drawn flat
                rows, cols = np.nonzero(mask)  # inside the object's cell of the 4x4 grid
                assert (rows // 16 == o.cell // 4).all() and (cols // 16 == o.cell % 4).all()
    assert scenes > 50 and texts > 5


def test_grounded_text_names_the_cells_and_leaves_the_images_alone():
    import json
    import re

    from data_pipelines.builtin import builtin_documents, cell_name

    cell = {cell_name(c): c for c in range(16)}
    checked = 0
    for (plain, _), (grounded, drawings) in zip(builtin_documents(200, seed=4), builtin_documents(200, seed=4, grounded=True)):
        assert [plain[k] for k in sorted(plain) if k.endswith("png")] == \
               [grounded[k] for k in sorted(grounded) if k.endswith("png")]
        objects = drawings[0].objects if drawings else []
        drawn = {(o.colour, o.shape, o.cell) for o in objects}
        where = {(o.colour, o.shape): o.cell for o in objects}
        text = grounded.get("txt", b"").decode()
        listed = re.findall(r"An? (\w+) (circle|square|triangle) at (row \d, column \d)\.", text)
        if listed:  # a layout caption lists every object once, in reading order
            assert [(c, s, cell[n]) for c, s, n in listed] == sorted(drawn, key=lambda o: o[2])
            checked += 1
        if "json" in grounded and "question" in (meta := json.loads(grounded["json"])):
            q, a = meta["question"], meta["answer"]
            if q.startswith("Where is the "):
                colour, shape = q[len("Where is the "):-1].split()
                assert cell[a] == where[(colour, shape)]
                checked += 1
            elif q.startswith("What is at "):
                at = [o for o in objects if o.cell == cell[q[len("What is at "):-1]]]
                assert a == ("nothing" if not at else f"{'an' if at[0].colour[0] in 'aeiou' else 'a'} "
                                                      f"{at[0].colour} {at[0].shape}")
                checked += 1
    assert checked > 30
