"""Reinforcement learning: policy-gradient objectives, advantages, prompt data and rollouts (GRPO), PPO's numerics,
and reward models. Everything on the host side is numpy; the objectives are jax."""
