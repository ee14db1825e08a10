"""Reward models and their contract: uint8 images and prompts in, one float per image out.

Imports nothing of the project's other packages (ARCHITECTURE.md).
"""
