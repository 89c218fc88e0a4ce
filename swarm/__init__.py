"""tightwad.swarm: peer-to-peer GGUF distribution in SHA-256-verified pieces."""
