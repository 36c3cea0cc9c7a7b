"""Rules for Hugging Face IDEFICS (filled in by the IDEFICS drop-ins)."""
RULES = []
