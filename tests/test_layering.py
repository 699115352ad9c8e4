"""Imports only go down: between the top-level packages, and between the modules of cmoe_vlm.

Read from the source (every import statement, lazy ones inside functions included), not from
what happens to be loaded, so a new upward import fails here the day it is written.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cmoe_base", "data_pipelines", "vision", "cmoe_vlm")
# Which project packages each package may import (the ground floor first).
ALLOWED = {"cmoe_base": set(), "data_pipelines": {"cmoe_base"}, "vision": {"cmoe_base"},
           "cmoe_vlm": {"cmoe_base", "data_pipelines", "vision"}}

# The modules of cmoe_vlm from the bottom up: each may import only modules listed before it.
# A package's __init__ comes after its modules, its __main__ after its __init__.
CMOE_VLM_LAYERS = """
    config
    model.layers.norm model.layers.rope model.layers.moe model.layers.document_attention model.layers.attention
    model.layers.joint_decoding model.layers.block model.layers
    model.compression model.chunk model.boundaries model.merge model.dechunk model.config model.concept_model model.conceptmoe model.vlm
    model
    objective
    flops.accounting flops.reallocation flops.cli flops flops.__main__
    checkpoints.tensor_files checkpoints.remote_code checkpoints.export checkpoints.families checkpoints.from_transformers
    checkpoints.to_transformers checkpoints.conversion checkpoints
    inference.session inference.generation inference.runner inference
    hf.processing hf.generation hf.modeling hf
    inspection.samples inspection.image_content inspection.analysis inspection.render inspection.plots inspection.report inspection
    eval.vqa_metric eval.tasks eval.long_context eval.builtin_suite eval.adaptivity eval.harness_tasks eval.harness eval.lmms_adapter
    eval
    training.stages training.config training.optim training.engine training.mfu training.prepare training.metrics training.collapse training.checkpoint
    training.evaluate training.resume training.expert_parallel training.initial_weights training.loop training
    cli.train cli.convert cli.hf_import cli.hf_export cli.eval cli.inspect cli
    eval.__main__ inspection.__main__
    __init__
""".split()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path, known: set[str]) -> set[str]:
    """Absolute names of the project modules `path` imports (relative imports resolved; `from pkg
    import module` counts the module, not the package)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & known
            out |= submodules if len(submodules) == len(node.names) else submodules | {base}
    return {m for m in out if m.split(".")[0] in PACKAGES}


def sources() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def test_packages_import_only_downward():
    src = sources()
    bad = [(mod, dep) for mod, path in src.items() for dep in imports(path, set(src))
           if dep.split(".")[0] != mod.split(".")[0] and dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]]
    assert not bad, f"upward or sideways imports between packages: {bad}"


def test_cmoe_vlm_modules_import_only_from_layers_below():
    src = sources()
    mods = {m: p for m, p in src.items() if m.split(".")[0] == "cmoe_vlm"}
    rank = {("cmoe_vlm" if m == "__init__" else f"cmoe_vlm.{m}"): i for i, m in enumerate(CMOE_VLM_LAYERS)}
    assert set(rank) == set(mods), f"modules missing from CMOE_VLM_LAYERS: {sorted(set(mods) - set(rank))}; " \
                                   f"listed but gone: {sorted(set(rank) - set(mods))}"
    bad = []
    for mod, path in mods.items():
        for dep in imports(path, set(src)):
            if dep in rank and dep != mod and rank[dep] >= rank[mod]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "imports from the same or a higher layer:\n" + "\n".join(sorted(bad))
