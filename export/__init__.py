"""export tools (installed as minigpt4_local.export)."""
