"""The commands (console scripts of pyproject.toml). Each parses and range-checks its arguments before
importing torch, then calls the library; each main is wrapped by `cmoe_base.commands.command`, the
error boundary every command shares (a user's mistake is one line naming it, exit status 2), and
writes its output folders through `cmoe_base.outputs` (staged, renamed into place whole).

    train.py      cmoe-train (python train_vlm.py)
    eval.py       cmoe-eval (python -m cmoe_vlm.eval)
    inspect.py    cmoe-inspect (python -m cmoe_vlm.inspection)
    convert.py    cmoe-convert: baseline MoE → ConceptMoE
    hf_import.py  cmoe-hf-import: a transformers MoE checkpoint → baseline export
    hf_export.py  cmoe-hf-export: a baseline export → transformers
"""
