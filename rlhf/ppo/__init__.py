"""PPO for language models (Schulman et al. 2017; Ziegler et al. 2019)."""
