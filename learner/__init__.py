"""Objectives (pure functions of tensors), couplings, pretraining and the learner.

Imports only ``samplers`` of the project's packages (ARCHITECTURE.md).
"""
