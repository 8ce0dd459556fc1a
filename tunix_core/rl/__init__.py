"""Reinforcement learning from rewards: PPO's and GRPO's numerics, rewards and reward models."""
