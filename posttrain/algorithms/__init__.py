"""RL and preference-learning math as pure tensor functions: `advantages` and `losses`."""
