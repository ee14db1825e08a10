"""Flow maths, policies, rollouts and the Trajectory contract.

Imports nothing of the project's other packages (ARCHITECTURE.md).
"""
