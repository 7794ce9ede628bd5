"""train tools (installed as minigpt4_local.train)."""
