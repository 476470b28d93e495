"""The execution engine (private): plain-HF fast path, sorted batches, shared prefix caches."""
