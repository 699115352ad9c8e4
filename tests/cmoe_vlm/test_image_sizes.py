"""Images at their own size (vision.max_pixels): fitting, per-image grids, packing, forward and cached
decoding equal to per-image references, 2D neighbours on non-square grids."""
import pytest
import torch
from PIL import Image

from cmoe_base import Batch, ConfigError, Modality
from cmoe_vlm.model.chunk import ChunkConfig
from cmoe_vlm.model.conceptmoe import ModelConfig
from cmoe_vlm.model.layers.moe import MoEConfig
from cmoe_vlm.model.vlm import ConceptMoEVLM, VLMConfig, above_patch_index
from data_pipelines.packing import Row, collate_rows
from data_pipelines.sequence import build_sequence
from data_pipelines.tokenizer import ByteTokenizer
from vision import ProjectorConfig, VisionConfig
from vision.sizes import fit_size

TOK = ByteTokenizer()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def sized_config(image_chunking: str = "2d", center: bool = True) -> VLMConfig:
    return VLMConfig(
        model=ModelConfig(dim=48, num_heads=4, encoder_layers=1, concept_layers=1, decoder_layers=1,
                          moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=48),
                          chunk=ChunkConfig(image_chunking=image_chunking)),
        vision=VisionConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, crop_pct=1.0,
                            dynamic_img_size=True, min_pixels=16 * 16, max_pixels=48 * 48),
        projector=ProjectorConfig(reduction=2, center=center),  # one token per 16x16 px
    )


def img(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))


# three sizes: grids 2x3, 3x2, 2x2 (and a second 2x3)
DOCS = [
    ["wide ", img(32, 48, 0), " then tall ", img(48, 32, 1), " end"],
    [img(32, 32, 2), " a square"],
    ["another wide one", img(32, 48, 3)],
]


def rows_of(model, docs, seq_len=None):
    seqs = [build_sequence(d, TOK, model.sequence_tokens_per_image()) for d in docs]
    n = seq_len or max(len(s) for s in seqs)
    rows = []
    for s in seqs:
        row = Row()
        row.add(s, 0, len(s))
        rows.append(row.pad_to(n, TOK.pad_id))
    return seqs, rows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ConceptMoEVLM(sized_config()).eval()


def test_fit_size_keeps_aspect_and_budget():
    for h, w in [(100, 300), (300, 100), (64, 64), (1000, 1000), (5, 7), (17, 900)]:
        H, W = fit_size(h, w, (16, 16), 256, 48 * 48)
        assert H % 16 == 0 and W % 16 == 0 and H >= 16 and W >= 16
        assert H * W <= 48 * 48 or min(H, W) == 16
        if min(h, w) >= 16 and max(h, w) / min(h, w) < 3:
            assert abs(H / W - h / w) / (h / w) < 0.5
    assert fit_size(32, 48, (16, 16), 256, 48 * 48) == (32, 48)  # already fits: unchanged
    assert fit_size(320, 480, (16, 16), 256, 48 * 48) == (32, 48)  # scaled down, 2:3 kept
    assert fit_size(8, 8, (16, 16), 32 * 32, 48 * 48) == (32, 32)  # scaled up to min_pixels
    assert fit_size(64, 64, (8, 16), 1, 64 * 64) == (64, 64)  # a non-square unit


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="dynamic_img_size"):
        VisionConfig(img_size=32, patch_size=8, max_pixels=1024)
    with pytest.raises(ConfigError, match="min_pixels"):
        VisionConfig(img_size=32, patch_size=8, dynamic_img_size=True, min_pixels=64)
    cfg = sized_config()
    with pytest.raises(ConfigError, match="keep_tokens"):
        VLMConfig(model=cfg.model, vision=cfg.vision, projector=ProjectorConfig(reduction=2, keep_tokens=2))


def test_transform_and_sequence_follow_each_image(model):
    tf = model.image_transform(train=False)
    wide = Image.new("RGB", (300, 100), (200, 10, 10))
    x = tf(wide)
    assert tuple(x.shape) == (3, 16, 48) or tuple(x.shape[1:]) == fit_size(100, 300, (16, 16), 256, 48 * 48)
    assert model.image_tokens(wide) == model.image_tokens(x) == (x.shape[1] // 16) * (x.shape[2] // 16)
    seq = build_sequence(["a", wide, "b", x], TOK, model.sequence_tokens_per_image())
    assert sum(seq.modality) == 2 * model.image_tokens(x)


def test_packed_rows_carry_each_image_size(model):
    seqs, rows = rows_of(model, DOCS)
    batch = collate_rows(rows, (3, 32, 32))
    assert batch.image_sizes == ((32, 48), (48, 32), (32, 32), (32, 48))
    assert tuple(batch.images.shape) == (4, 3, 48, 48)  # padded to the largest
    assert model.image_grids(batch) == [(2, 3), (3, 2), (2, 2), (2, 3)]
    assert batch.image_tokens == 6 + 6 + 4 + 6 == int((batch.modality == Modality.IMAGE).sum())
    # the padding does not leak in: the second image equals itself alone
    torch.testing.assert_close(batch.images[1, :, :48, :32], DOCS[0][3])
    assert (batch.images[1, :, :, 32:] == 0).all()


def test_2d_neighbours_on_non_square_grids():
    # a 2x3 image then a 3x2 image in one row, a 2x2 in the next row
    mod = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0],
                        [0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    above = above_patch_index(mod, torch.tensor([3, 2, 2]))
    assert above[0].tolist() == [-1, -1, -1, -1, 1, 2, 3, -1, -1, -1, 8, 9, 10, 11, -1]
    assert above[1].tolist() == [-1, -1, -1, 1, 2] + [-1] * 10


def test_forward_equals_each_image_alone(model):
    """A packed batch of three sizes gives, per document, the logits of that document alone; grouping by
    size in the ViT gives each image's tokens as if it were encoded alone."""
    seqs, rows = rows_of(model, DOCS)
    batch = collate_rows(rows, (3, 32, 32))
    with torch.no_grad():
        out = model(batch)
        for r, doc in enumerate(DOCS):
            _, one = rows_of(model, [doc])
            ref = model(collate_rows(one, (3, 32, 32)))
            n = len(seqs[r])
            torch.testing.assert_close(out.logits[r, :n], ref.logits[0, :n], atol=1e-5, rtol=1e-5)
        # image tokens: each image's projection, alone, at its own size
        feats = model.encode_images(batch.images, batch.image_sizes)
        alone = torch.cat([model.projector(model.vision(im[None]), model.vision.grid_for(*im.shape[-2:]))[0]
                           for doc in DOCS for im in doc if isinstance(im, torch.Tensor)])
        torch.testing.assert_close(feats, alone, atol=1e-5, rtol=1e-5)


def test_two_documents_in_one_row_and_one_image_in_another(model):
    seqs = [build_sequence(d, TOK, model.sequence_tokens_per_image()) for d in DOCS]
    row = Row()
    row.add(seqs[0], 0, len(seqs[0]))
    row.add(seqs[1], 0, len(seqs[1]))
    row2 = Row()
    row2.add(seqs[2], 0, len(seqs[2]))
    n = len(row) + 3
    batch = collate_rows([row.pad_to(n, TOK.pad_id), row2.pad_to(n, TOK.pad_id)], (3, 32, 32))
    with torch.no_grad():
        out = model(batch)
        starts = [0, len(seqs[0])]
        for d, (r, start) in enumerate([(0, 0), (0, starts[1]), (1, 0)]):
            _, one = rows_of(model, [DOCS[d]])
            ref = model(collate_rows(one, (3, 32, 32))).logits[0, :len(seqs[d])]
            torch.testing.assert_close(out.logits[r, start:start + len(seqs[d])], ref, atol=1e-5, rtol=1e-5)


def test_cached_decoding_with_mixed_sizes_equals_the_full_forward(model):
    doc = ["wide ", img(32, 48, 0), " tall ", img(48, 32, 1), " square ", img(32, 32, 2), " and the end."]
    seq = build_sequence(doc, TOK, model.sequence_tokens_per_image(), add_eos=False)
    ids = torch.tensor([seq.input_ids])
    mod = torch.tensor([seq.modality])
    images = [p for p in doc if isinstance(p, torch.Tensor)]
    from cmoe_base import stack_images
    stacked, sizes = stack_images(images)
    n = len(seq)
    split = seq.image_spans[1][1]  # prefill through the second image; the third comes in an extend
    with torch.no_grad():
        full = model(Batch.of(ids, modality=mod, images=stacked, image_sizes=sizes)).logits
        state = model.new_state(1)
        s1, s2 = stack_images(images[:2])
        pre = model.extend(Batch.of(ids[:, :split], modality=mod[:, :split], images=s1, image_sizes=s2), state).logits
        end3 = seq.image_spans[2][1]
        mid = model.extend(Batch.of(ids[:, split:end3], modality=mod[:, split:end3], images=images[2][None]),
                           state).logits
        steps = [model.extend(Batch.of(ids[:, t:t + 1], modality=mod[:, t:t + 1]), state).logits
                 for t in range(end3, n)]
    torch.testing.assert_close(torch.cat([pre, mid, *steps], 1), full, atol=1e-4, rtol=1e-4)


def test_default_square_layout_unchanged():
    """Without max_pixels the batch carries no sizes and every image keeps tokens_per_image tokens."""
    cfg = VLMConfig(model=sized_config().model,
                    vision=VisionConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3, crop_pct=1.0),
                    projector=ProjectorConfig(reduction=2))
    torch.manual_seed(0)
    m = ConceptMoEVLM(cfg).eval()
    assert m.sequence_tokens_per_image() == 4 == cfg.max_tokens_per_image
    seq = build_sequence(["x", img(32, 32, 0)], TOK, m.sequence_tokens_per_image())
    row = Row()
    row.add(seq, 0, len(seq))
    batch = collate_rows([row], (3, 32, 32))
    assert batch.image_sizes is None and m.image_grids(batch) == [(2, 2)]


def test_flops_count_each_image_at_its_own_size(model):
    from cmoe_vlm.training.mfu import vision_flops_per_image

    small, large = vision_flops_per_image(model, (32, 32)), vision_flops_per_image(model, (48, 48))
    assert large > 2 * small  # 9 patches' worth of tokens vs 4, plus the same prefix
    seqs, rows = rows_of(model, DOCS)
    batch = collate_rows(rows, (3, 32, 32))
    from cmoe_vlm.training.mfu import forward_flops
    with torch.no_grad():
        out = model(batch)
    lm_only = forward_flops(model.lm, batch, out.concept_lengths)
    want = sum(vision_flops_per_image(model, s) for s in batch.image_sizes)
    assert forward_flops(model, batch, out.concept_lengths) == pytest.approx(lm_only + want)


def test_experiment_config_and_loader_stream_images_at_their_own_size(tmp_path):
    import io

    import webdataset as wds

    from cmoe_vlm.training.config import load_experiment
    from data_pipelines.loader import StreamingLoader

    exp = load_experiment("configs/tiny.yaml", ["vision.dynamic_img_size=true", "vision.max_pixels=4096",
                                                "vision.min_pixels=1024"])
    unit = exp.vlm.image_unit
    assert exp.data.image_token_unit == unit and exp.data.tokens_per_image == 4096 // (unit[0] * unit[1])
    sizes = [(40, 120), (120, 40), (64, 64), (500, 250)]  # (width, height) of the source images
    with wds.TarWriter(str(tmp_path / "s.tar"), mtime=0.0) as w:
        for i, (width, height) in enumerate(sizes):
            buf = io.BytesIO()
            Image.new("RGB", (width, height), (10 * i, 100, 200)).save(buf, format="PNG")
            w.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": f"picture {i}".encode()})
    torch.manual_seed(0)
    m = ConceptMoEVLM(exp.vlm).eval()
    from dataclasses import replace
    cfg = replace(exp.data, shards=str(tmp_path / "s.tar"), batch_size=2, seq_len=128, num_workers=0,
                  shuffle_buffer=0)
    batches = list(StreamingLoader(cfg, image_transform=m.image_transform(train=False)))
    got = [s for b in batches for s in b.sizes_of_images()]
    tf = m.image_transform(train=False)
    assert sorted(got) == sorted(tf.size(Image.new("RGB", s)) for s in sizes)
    assert len(set(got)) == 4 and all(h * w <= 4096 and h * w >= 1024 for h, w in got)
    for b in batches:
        assert b.image_tokens == sum(r * c for r, c in m.image_grids(b))
        with torch.no_grad():
            m(b)  # the model takes the loader's batches as they are


def exported(cfg: VLMConfig, tokenizer_folder, tmp_path):
    """(tokenizer, model, export folder, its AutoProcessor) of a random model of `cfg` with a BPE tokenizer."""
    import transformers

    from cmoe_vlm.checkpoints.export import save_pretrained
    from data_pipelines.tokenizer import HFTokenizer

    tok = HFTokenizer(tokenizer_folder)
    cfg.model.vocab_size = tok.vocab_size
    torch.manual_seed(0)
    model = ConceptMoEVLM(VLMConfig(model=cfg.model, vision=cfg.vision, projector=cfg.projector)).eval()
    folder = save_pretrained(model, tmp_path / "m", tokenizer=str(tokenizer_folder))
    transformers.AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return tok, model, folder, transformers.AutoProcessor.from_pretrained(folder)


def test_transformers_processor_and_generate_with_mixed_sizes(bpe_tokenizer_folder, tmp_path):
    """The export's AutoProcessor lays out images of three sizes as training does (its own token count
    each, pixel_values padded + image_sizes), and generate() (cache on and off, beams) gives our tokens."""
    transformers = pytest.importorskip("transformers")
    import cmoe_vlm.hf  # noqa: F401  registers the Auto classes
    from cmoe_vlm.inference.generation import generate
    from cmoe_vlm.inference.runner import ModelRunner

    tok, model, folder, processor = exported(sized_config(), bpe_tokenizer_folder, tmp_path)
    pictures = [Image.new("RGB", (90, 30), (200, 30, 30)), Image.new("RGB", (30, 60), (20, 30, 200)),
                Image.new("RGB", (40, 40), (20, 200, 20))]
    texts = ["<image> two red circles", "how many <image> circles? <image>"]
    inputs = processor(text=texts, images=pictures)
    runner = ModelRunner(model, tok)
    seqs = [runner.sequence([pictures[0], " two red circles"]),
            runner.sequence(["how many ", pictures[1], " circles? ", pictures[2]])]
    assert len({sum(s.modality) for s in seqs}) == 2  # the images differ in token count
    T = inputs["input_ids"].shape[1]
    for r, s in enumerate(seqs):
        assert inputs["input_ids"][r, T - len(s):].tolist() == s.input_ids
        assert inputs["mm_token_type_ids"][r, T - len(s):].tolist() == s.modality
    sizes = [tuple(im.shape[-2:]) for s in seqs for im in s.images]
    assert inputs["image_sizes"].tolist() == [list(x) for x in sizes] and len(set(sizes)) == 3
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = generate(model, seqs, 4)
    for use_cache in (True, False):
        out = hf.generate(**inputs, max_new_tokens=4, eos_token_id=None, use_cache=use_cache)
        assert out[:, T:].tolist() == ours, use_cache
    kw = dict(max_new_tokens=2, num_beams=2, eos_token_id=None)
    assert torch.equal(hf.generate(**inputs, **kw), hf.generate(**inputs, use_cache=False, **kw))


def test_inspection_draws_each_image_on_its_own_grid(model, tmp_path):
    from cmoe_vlm.inference.runner import ModelRunner
    from cmoe_vlm.inspection.analysis import analyse, image_records
    from cmoe_vlm.inspection.plots import image_chunk_map
    from vision.transforms import image_mean_std

    runner = ModelRunner(model, TOK)
    docs = [["a wide one ", Image.new("RGB", (96, 32), (200, 0, 0)), " and a tall one ",
             Image.new("RGB", (32, 64), (0, 0, 200))]]
    samples = analyse(runner, docs)
    assert samples[0].image_grids == [(1, 5), (4, 2)]  # 96x32 -> 80x16 px (budget 48x48), 32x64 kept
    records = image_records(samples, model.cfg.image_grid)
    assert [r["grid"] for r in records] == [list(g) for g in samples[0].image_grids]
    assert [len(d) for d in samples[0].image_diffs] == [r * c for r, c in samples[0].image_grids]
    for k in range(2):
        path = image_chunk_map(samples[0], k, model.cfg.image_grid, image_mean_std(model.vision),
                               tmp_path / f"m{k}.png", "t")
        assert path.exists()


# ---------------------------------------------------------------------------------------------- tiles
def tiled_config(max_tiles: int = 4, tile_boundaries: str = "forced") -> VLMConfig:
    cfg = sized_config()
    return VLMConfig(model=cfg.model, projector=ProjectorConfig(reduction=2, center=True),
                     vision=VisionConfig(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                                         crop_pct=1.0, max_tiles=max_tiles, tile_boundaries=tile_boundaries))


def test_tile_grid_follows_the_aspect_ratio():
    from vision.sizes import tile_grid
    assert tile_grid(32, 32, (32, 32), 4) == (1, 1)  # small: one tile, no tiling
    assert tile_grid(64, 64, (32, 32), 4) == (2, 2)
    assert tile_grid(40, 130, (32, 32), 4) == (1, 3)  # aspect 3.25: 1x3 is closer than 1x4
    assert tile_grid(100, 50, (32, 32), 6) == (2, 1)
    assert tile_grid(200, 100, (32, 32), 8) == (4, 2)  # same aspect, area closer
    assert tile_grid(1000, 1000, (32, 32), 4) == (2, 2)  # capped by max_tiles
    with pytest.raises(ConfigError, match="max_tiles"):
        VisionConfig(img_size=32, patch_size=8, dynamic_img_size=True, max_pixels=4096, max_tiles=4)


def test_tiles_layout_forced_boundaries_and_cached_decoding():
    from cmoe_base import Tiles
    from data_pipelines.sequence import TILE_ROW_SEPARATOR

    torch.manual_seed(0)
    m = ConceptMoEVLM(tiled_config()).eval()
    tf = m.image_transform(train=False)
    big = Image.new("RGB", (64, 64), (200, 30, 30))
    big.paste((10, 10, 200), (0, 0, 32, 20))
    tiles = tf(big)
    assert isinstance(tiles, Tiles) and (tiles.rows, tiles.cols) == (2, 2) and len(tiles.tiles) == 4
    torch.testing.assert_close(tiles.thumbnail, tf(big.resize((32, 32), Image.Resampling.BICUBIC)), atol=0.1, rtol=0)
    assert not isinstance(tf(Image.new("RGB", (32, 32))), Tiles)  # one tile: a plain image
    seq = build_sequence(["see ", tiles, " done"], TOK, m.sequence_tokens_per_image(), add_eos=False)
    assert len(seq.images) == 5 and sum(seq.modality) == 5 * 4  # thumbnail + 4 tiles, 2x2 tokens each
    sep = TOK.encode(TILE_ROW_SEPARATOR)
    ends = [e for _, e in seq.image_spans]
    assert seq.input_ids[ends[2]:ends[2] + len(sep)] == sep  # a separator after the first tile row only
    assert all(seq.input_ids[e:e + len(sep)] != sep for e in (ends[0], ends[1], ends[3]))
    ids, mod = torch.tensor([seq.input_ids]), torch.tensor([seq.modality])
    images = torch.stack(seq.images)
    with torch.no_grad():
        out = m(Batch.of(ids, modality=mod, images=images))
        last = [e - 2 for e in ends]  # each tile's last image token: a forced boundary
        assert out.boundaries[0, last].all()
        state = m.new_state(1)
        split = seq.image_spans[2][1]
        pre = m.extend(Batch.of(ids[:, :split], modality=mod[:, :split], images=images[:3]), state).logits
        rest = m.extend(Batch.of(ids[:, split:], modality=mod[:, split:], images=images[3:]), state).logits
    torch.testing.assert_close(torch.cat([pre, rest], 1), out.logits, atol=1e-4, rtol=1e-4)


def test_learned_tile_boundaries_one_image_run():
    """vision.tile_boundaries: learned: the tiles are one image run (no marker, no separator), so only the
    run's end is forced; 2D neighbours stay inside each tile; split decoding equals the full forward."""
    from cmoe_vlm.model.chunk import forced_boundaries
    from cmoe_vlm.model.vlm import above_patch_index

    with pytest.raises(ConfigError, match="tile_boundaries.*forced, learned"):
        VisionConfig(img_size=32, patch_size=8, max_tiles=4, tile_boundaries="soft")
    with pytest.raises(ConfigError, match="tile_boundaries.*max_tiles"):
        VisionConfig(img_size=32, patch_size=8, tile_boundaries="learned")
    torch.manual_seed(0)
    m = ConceptMoEVLM(tiled_config(tile_boundaries="learned")).eval()
    big = Image.new("RGB", (64, 64), (200, 30, 30))
    big.paste((10, 10, 200), (0, 0, 32, 20))
    seq = build_sequence(["see ", m.image_transform(train=False)(big), " done"], TOK, m.sequence_tokens_per_image(),
                         add_eos=False)
    assert len(seq.images) == 5 and len(set(seq.image_spans)) == 2  # thumbnail block, one block of 4 tiles
    (_, thumb_end), (tiles_start, tiles_end) = seq.image_spans[0], seq.image_spans[1]
    assert seq.modality[tiles_start + 1:tiles_end - 1] == [int(Modality.IMAGE)] * 16
    ids, mod = torch.tensor([seq.input_ids]), torch.tensor([seq.modality])
    forced = forced_boundaries(torch.zeros_like(ids, dtype=torch.bool), mod)[0]
    tile_ends = [tiles_start + 4 * k for k in range(1, 5)]  # each tile's last image token
    assert forced[tile_ends].tolist() == [False, False, False, True]  # only the run's end
    above = above_patch_index(mod, 2, 4)[0, tiles_start + 1:tiles_end - 1]
    assert above.view(4, 4)[:, :2].eq(-1).all()  # each tile's top row: none above, whatever came before
    assert (above.view(4, 4)[:, 2:] - torch.arange(tiles_start + 1, tiles_end - 1).view(4, 4)[:, 2:]).eq(-2).all()
    images = torch.stack(seq.images)
    with torch.no_grad():
        out = m(Batch.of(ids, modality=mod, images=images))
        state = m.new_state(1)
        pre = m.extend(Batch.of(ids[:, :thumb_end], modality=mod[:, :thumb_end], images=images[:1]), state).logits
        rest = m.extend(Batch.of(ids[:, thumb_end:], modality=mod[:, thumb_end:], images=images[1:]), state).logits
    torch.testing.assert_close(torch.cat([pre, rest], 1), out.logits, atol=1e-4, rtol=1e-4)
    from cmoe_vlm.inference.runner import ModelRunner
    from cmoe_vlm.inspection.analysis import analyse
    inspected, = analyse(ModelRunner(m, TOK), [["see ", big, " done"]])  # each tile's chunk map from its own tokens
    assert inspected.image_starts(m.cfg.image_grid).tolist() == [seq.image_spans[0][0] + 1] + [tiles_start + 1 + 4 * k
                                                                                                for k in range(4)]
    pytest.importorskip("transformers")
    from cmoe_vlm.hf.processing import ConceptMoEImageProcessor
    assert ConceptMoEImageProcessor.for_encoder(m.vision).transform(big).forced is False  # the export's layout


def test_transformers_processor_lays_out_tiles_as_training(bpe_tokenizer_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    import cmoe_vlm.hf  # noqa: F401
    from cmoe_vlm.inference.generation import generate
    from cmoe_vlm.inference.runner import ModelRunner

    tok, model, folder, processor = exported(tiled_config(), bpe_tokenizer_folder, tmp_path)
    pictures = [Image.new("RGB", (64, 32), (200, 30, 30)), Image.new("RGB", (30, 30), (20, 30, 200))]
    inputs = processor(text=["<image> two <image> red"], images=pictures)
    seq = ModelRunner(model, tok).sequence([pictures[0], " two ", pictures[1], " red"])
    assert inputs["input_ids"][0].tolist() == seq.input_ids and len(seq.images) == 4  # thumb + 1x2 tiles + 1
    torch.testing.assert_close(inputs["pixel_values"], torch.stack(seq.images))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    out = hf.generate(**inputs, max_new_tokens=3, eos_token_id=None)
    assert out[:, len(seq):].tolist() == generate(model, [seq], 3)


def test_exact_resume_with_images_at_their_own_size(tmp_path):
    """A loader stopped mid-stream and resumed from its state gives the same batches, image sizes included."""
    import copy
    import io
    import itertools

    import webdataset as wds

    from data_pipelines.loader import DataConfig, StreamingLoader
    from vision.transforms import FitTransform

    with wds.TarWriter(str(tmp_path / "s.tar"), mtime=0.0) as w:
        for i in range(12):
            buf = io.BytesIO()
            Image.new("RGB", (16 + 24 * (i % 4), 64 - 12 * (i % 3)), (20 * i, 100, 50)).save(buf, format="PNG")
            w.write({"__key__": f"{i:04d}", "png": buf.getvalue(), "txt": f"picture number {i} " .encode() * 3})
    cfg = DataConfig(shards=str(tmp_path / "s.tar"), batch_size=2, seq_len=48, num_workers=0, shuffle_buffer=4,
                     image_size=32, tokens_per_image=16, image_token_unit=(16, 16))
    tf = FitTransform((16, 16), 256, 64 * 64, "bicubic", (0.5,) * 3, (0.5,) * 3)
    full = list(StreamingLoader(cfg, image_transform=tf))
    first = StreamingLoader(cfg, image_transform=tf)
    head = list(itertools.islice(iter(first), 3))
    resumed = StreamingLoader(cfg, image_transform=tf)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    got = head + list(resumed)
    assert len(got) == len(full) > 3 and any(b.image_sizes for b in full)
    for a, b in zip(got, full):
        assert torch.equal(a.input_ids, b.input_ids) and a.image_sizes == b.image_sizes
        assert torch.equal(a.images, b.images)


def test_bench_image_sizes_smoke(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bench_image_sizes", root / "bench/bench_image_sizes.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "sizes.json"
    monkeypatch.chdir(root)
    monkeypatch.setattr("sys.argv", ["bench", "--images", "3", "--repeats", "1", "--max-pixels", "4096",
                                     "--out", str(out)])
    bench.main()
    res = json.loads(out.read_text())
    assert set(res["results"]) == {"grouped", "padded", "square"}
    assert res["results"]["grouped"]["vit_patches"] <= res["results"]["padded"]["vit_patches"]


def test_bench_image_content_smoke(model, tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    from cmoe_vlm.checkpoints.export import save_pretrained

    folder = save_pretrained(model, tmp_path / "m")
    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bench_image_content", root / "bench/bench_image_content.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "content.json"
    monkeypatch.setattr("sys.argv", ["bench", "--model", str(folder), "--sizes", "32,48", "--images", "1",
                                     "--out", str(out)])
    bench.main()
    res = json.loads(out.read_text())["results"]
    assert res["flat@48"]["tokens"] == 9 and 1 <= res["busy@48"]["concepts_mean"] <= 9


def test_bench_tile_boundaries_counts_concepts_and_straddled_edges():
    """bench/bench_tile_boundaries.py's measurement on untrained tiled models: every tile edge a boundary
    when forced; with learned edges the same images, tiles and grids, edges free to be straddled."""
    import importlib.util
    from pathlib import Path

    from cmoe_vlm.inference.runner import ModelRunner

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("bench_tile_boundaries", root / "bench/bench_tile_boundaries.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    docs = [["a ", Image.new("RGB", (64, 64), (200, 30, 30)), " b ", Image.new("RGB", (32, 32))],
            [Image.new("RGB", (128, 32), (20, 30, 200)), " c"]]
    found = {}
    for mode in ("forced", "learned"):
        torch.manual_seed(0)
        found[mode] = bench.tile_records(ModelRunner(ConceptMoEVLM(tiled_config(tile_boundaries=mode)).eval(), TOK),
                                         docs, batch_size=1)
    assert [r["grid"] for r in found["forced"]] == [r["grid"] for r in found["learned"]] == [[2, 2], [1, 4]]
    assert [r["edges"] for r in found["learned"]] == [3, 3] and [r["tile_tokens"] for r in found["learned"]] == [16, 16]
    assert all(r["edges_straddled"] == 0 for r in found["forced"])
    for r in found["forced"] + found["learned"]:
        assert r["edges"] - r["edges_straddled"] <= r["tile_concepts"] <= r["tile_tokens"]
    summary = bench.summarise(found["learned"])
    assert summary["images"] == 2 and summary["by_grid"]["2x2"]["edges"] == 3
