"""An export written before the package layout of issue #25 (tests/assets/export_69f0ad8, made by its
make.py at main 69f0ad8) still loads, every way a user loads one, with the logits that commit computed:
`import cmoe_vlm.hf` + AutoModelForCausalLM, our `load_pretrained`, and `trust_remote_code=True` both
where cmoe_vlm is not importable (the export's own bundled sources run) and where it is (the bundle
imports today's package by the module names of that time).

Since 5969dfa a modality run ends in a forced boundary (the token before a switch; it used to be the
first token after it): today's code gives an image prompt other logits from its first image block on,
by design. So with today's code the text prompts' logits are compared whole and the image prompts'
up to their first `<img_start>`; the bundled sources (69f0ad8's own code) give every logit."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmoe_base import Batch
from cmoe_vlm.checkpoints.export import load_pretrained
from data_pipelines.tokenizer import ByteTokenizer

ASSET = Path(__file__).resolve().parents[1] / "assets" / "export_69f0ad8"
FOLDER = ASSET / "model"
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(ASSET / "expected.safetensors"))


def same_semantics(expected: dict[str, torch.Tensor]) -> int:
    """Positions of the image prompts before their first image block, where 5969dfa changed nothing."""
    starts = (expected["input_ids"] == ByteTokenizer.img_start_id).int().argmax(1)
    assert (starts == starts[0]).all() and starts[0] > 0
    return int(starts[0])


# The expected logits were computed on another CPU: fp32 kernels differ in the last bits between CPUs
# (here 6e-8 of logits ~0.1 on an AMD EPYC). A wrong weight mapping or config reading is O(0.1).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def assert_69f0ad8_logits(image_logits: torch.Tensor, text_logits: torch.Tensor, expected: dict[str, torch.Tensor],
                          whole: bool = False) -> None:
    torch.testing.assert_close(text_logits, expected["text_logits"], **TOL)
    n = expected["logits"].shape[1] if whole else same_semantics(expected)
    torch.testing.assert_close(image_logits[:, :n], expected["logits"][:, :n], **TOL)


def hf_logits(model, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        image = model(input_ids=x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                      pixel_values=x["pixel_values"]).logits
        return image, model(input_ids=x["text_input_ids"]).logits


def test_the_old_export_loads_with_import_cmoe_vlm_hf_and_gives_its_logits(expected):
    import cmoe_vlm.hf  # noqa: F401  registers the Auto classes

    model = transformers.AutoModelForCausalLM.from_pretrained(FOLDER).eval()
    assert_69f0ad8_logits(*hf_logits(model, expected), expected)


def test_the_old_export_loads_with_load_pretrained_and_gives_its_logits(expected):
    model, meta = load_pretrained(FOLDER)
    assert meta["version"] == 2 and meta["tokenizer"] == "byte"
    image = Batch.of(expected["input_ids"], modality=expected["mm_token_type_ids"], images=expected["pixel_values"])
    with torch.no_grad():
        assert_69f0ad8_logits(model(image).logits, model(Batch.of(expected["text_input_ids"])).logits, expected)


REMOTE = """
import sys, importlib.util
if sys.argv[1] == "without":
    sys.path.append(sys.argv[2])  # the environment's packages, without its .pth files (cmoe-vlm's editable install)
    assert importlib.util.find_spec("cmoe_vlm") is None, "cmoe_vlm is importable"
else:
    assert importlib.util.find_spec("cmoe_vlm") is not None, "cmoe_vlm is not importable"
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
folder, expected, out = sys.argv[3:6]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
bundled = sys.modules["cmoe_vlm"].__file__.startswith("<cmoe_vlm_code>")
assert bundled == (sys.argv[1] == "without"), sys.modules["cmoe_vlm"].__file__
x = load_file(expected)
with torch.no_grad():
    image = model(input_ids=x["input_ids"], mm_token_type_ids=x["mm_token_type_ids"],
                  pixel_values=x["pixel_values"]).logits
    text = model(input_ids=x["text_input_ids"]).logits
torch.save((image, text), out)
"""


@pytest.mark.parametrize("cmoe_vlm_importable", [False, True], ids=["bundled-sources", "installed-package"])
def test_the_old_export_loads_with_trust_remote_code(expected, tmp_path, cmoe_vlm_importable):
    env = dict(os.environ)
    if cmoe_vlm_importable:
        env["PYTHONPATH"] = str(ASSET.parents[2])  # this checkout's cmoe_vlm
    else:
        env.pop("PYTHONPATH", None)
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    out = tmp_path / "logits.pt"
    flags = [] if cmoe_vlm_importable else ["-S"]
    proc = subprocess.run([sys.executable, *flags, "-c", REMOTE, "with" if cmoe_vlm_importable else "without",
                           sysconfig.get_paths()["purelib"], str(FOLDER), str(ASSET / "expected.safetensors"),
                           str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_69f0ad8_logits(*torch.load(out), expected, whole=not cmoe_vlm_importable)
