import hashlib
from collections import Counter

from data_pipelines.builtin import builtin_samples, main, write_builtin_dataset
from data_pipelines.loader import read_tar
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
    qa = [c for c in captions if c.startswith("Question:")]
    assert qa and all(" Answer: " in c for c in qa)
    long_docs = [p[0] for p in texts if len(p) == 1 and isinstance(p[0], str)]
    assert any("pass key is" in d for d in long_docs)


def test_cli(tmp_path):
    main(["--out", str(tmp_path), "--num-train", "20", "--num-heldout", "5"])
    assert load_manifest(tmp_path / "train")["samples"] == 20 and load_manifest(tmp_path / "heldout")["samples"] == 5
