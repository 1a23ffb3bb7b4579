"""Prompt sources (the synthetic image world, LLaVA-Instruct-150K), their quality filter, image reading."""
