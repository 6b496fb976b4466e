"""Training-framework integrations, each in its own module so that importing gradstats
imports none of the frameworks:

- :mod:`gradstats.integrations.lightning`: ``GradStatsCallback`` for Lightning's ``Trainer``
  (``lightning.pytorch`` or ``pytorch_lightning``);
- :mod:`gradstats.integrations.huggingface`: ``GradStatsCallback`` for the Hugging Face
  ``transformers.Trainer``.

Code that calls ``torch.nn.utils.clip_grad_norm_`` itself (timm, nanoGPT, Fabric,
accelerate) is served by :func:`gradstats.route_torch_clipping` instead.
"""
