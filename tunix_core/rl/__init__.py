"""Reinforcement-learning pieces shared by the RL modes: policy-gradient objectives, advantages, prompt data,
rollouts and the rollout batch's layout. Everything on the host side is numpy; the objectives are jax."""
