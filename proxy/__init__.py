"""tightwad.proxy: the front door on :8088 (OpenAI API, speculation loop, drafters, modes)."""
