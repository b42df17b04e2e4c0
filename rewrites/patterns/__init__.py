"""Region patterns (self-attention, cross-attention, MLP, user patterns). Each module registers
its matcher with ``register_pattern``; the registry imports them all on first lookup."""
