"""quantize tools (installed as minigpt4_local.quantize)."""
