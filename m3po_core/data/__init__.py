"""Prompt sources: the synthetic image world and LLaVA-Instruct-150K."""
