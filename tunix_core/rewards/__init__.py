"""Reward functions for the RL modes, referenced by name from the config (`reward_functions`).

A reward function is called once per rollout batch as fn(prompts, completions, **columns) -> list of floats,
one per completion: prompts are the prompt texts (or chat messages), completions the generated texts (EOS left
out), columns every other field of the prompt records (e.g. `answer`) plus `completion_ids` (the generated token
ids), each a list aligned with the completions. Built-in names are in `builtin.BUILTINS`; any other name is
"module:function", imported at start-up.
"""
