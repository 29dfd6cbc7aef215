"""open_clip checkpoints without open_clip: config (:mod:`.config`), weights mapping onto
transformers' ``CLIPModel`` (:mod:`.convert`), loading (:mod:`.loading`), open_clip's transform
(:mod:`.preprocessing`) and tokenizer (:mod:`.tokenizer`), and export between the two formats
(:mod:`.export`: :func:`~phiclip.open_clip.export.export_to_hf`,
:func:`~phiclip.open_clip.export.export_to_open_clip`). The encoder kind is
:mod:`phiclip.encoders.open_clip`.

Nothing is imported here, so ``import phiclip.open_clip.config`` stays light.
"""
