"""Fine-tuning: contrastive CLIP/SigLIP training (:mod:`.clip`), probes on frozen embeddings and
classification with them (:mod:`.probe`), and a student vision tower distilled into Phi-3-vision's
image path (:mod:`.adapter`). The one training loop of the first and the last is :mod:`.loop` (each
is a :class:`~phiclip.finetune.loop.TrainingMode`); its machinery (schedule, data order, checkpoints,
metrics) is in :mod:`.common`, data in :mod:`.data`.

Submodules import torch and transformers when used; importing this package is light.
"""

from __future__ import annotations
