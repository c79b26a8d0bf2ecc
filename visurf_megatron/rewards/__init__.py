"""Verifiable rewards (VisionReasoner grounding, GUI, anomaly, math).

Deliberately empty of imports: ``rewards.math`` pulls in sympy, which importers of the parsing
helpers should not pay for. Use ``rewards.registry.get_reward_fn`` and ``rewards.types.RewardBreakdown``.
"""
