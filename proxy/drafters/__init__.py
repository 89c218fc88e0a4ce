"""Drafters: whatever proposes the target's next tokens, as token ids of the target's vocabulary.

`base.py` is the contract every kind meets (`DraftRequest` in, `Proposal` out); the kinds are
`llama_server.py` (token ids, its KV cache reused), `text.py` (OpenAI-compatible or Ollama servers,
re-tokenized) and `ngram.py` (prompt lookup, no model). `guard.py` makes any of them fail soft and
`race.py` runs several at once behind the same interface. Exactness never depends on a drafter:
the engine verifies every token.
"""
