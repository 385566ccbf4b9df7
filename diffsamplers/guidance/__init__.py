"""Guidance methods (minority guidance, CADS, Feynman-Kac SMC, soft-value guidance) plug in here.

Classifier-free guidance lives in :class:`diffsamplers.Denoiser`.
"""
