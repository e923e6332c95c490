"""Baseline generators of the other generative architectures, judged on shared metrics.

- ``rnn``:           LSTM/GRU causal LM as a transformers model (``type: rnn_lm``); PPO can train it
- ``gan``:           DCGAN with spectral norm and an EMA generator (``type: gan``)
- ``vae``:           convolutional VAE with a beta option (``type: vae``)
- ``diffusion``:     DDPM training, DDIM sampling, denoising and inpainting (``type: diffusion``)
- ``diffusion_pref``: Diffusion-DPO on a DDPM, from a reward or from labeled image pairs (``type: diffusion_dpo``)
- ``images``:        one image-data interface (sklearn digits, IDX files, image folders, hub datasets)
- ``image_metrics``: Fréchet distance, KID, precision/recall, class entropy, memorisation, floor, intervals
- ``report``:        the comparison report over all of them (``type: baseline_report``)

Importing this package is cheap. ``rnn_model`` registers the RNN architecture
with transformers' Auto classes when imported (``rlhf.recipe.load_plugins``
does, for every ``rlhf`` command); the image modules import diffusers,
scikit-learn and scipy on first use.
"""
