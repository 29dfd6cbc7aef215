"""Model code shared by the encoders: checkpoint files (:mod:`~phiclip.models.checkpoint`), the CLIP
vision tower (:mod:`~phiclip.models.clip_config`, :mod:`~phiclip.models.clip_vision`) and small
tensor operations (:mod:`~phiclip.models.ops`). Importing this package imports nothing heavy."""
