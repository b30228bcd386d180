"""The budget, in one place: per-chain schedules, fidelity (deviation, tolerance, R_bud, metrics),
balancing of the budget distribution, the budget statement in prompts, and keyed randomness."""
