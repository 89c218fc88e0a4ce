"""tightwad.engine: the coordinator that loads the target across the RPC pool and verifies drafts."""
